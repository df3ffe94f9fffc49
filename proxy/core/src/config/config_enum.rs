//! The `config_enum!` macro: an enum whose variants are spelt in the file as
//! given strings (serde renames), with `as_str` and `Display` returning that
//! spelling. Declared with `#[macro_use]` first in `config/mod.rs`, so every
//! section file can use it.

/// Declares a `pub enum` deserialised from the given spellings.
///
/// Paths in the expansion are absolute, so a call site needs no imports.
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ::serde::Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// The spelling used in the config file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
