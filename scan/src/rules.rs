//! The rules file: parsing, merging a user's file over the built-in one, and
//! compiling every rule once.

use crate::allow::{Allow, Glob};
use crate::ScanError;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The built-in rules (`scan/rules.toml`).
pub const BUILTIN_RULES: &str = include_str!("../rules.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    entropy: Option<EntropyThresholds>,
    #[serde(default)]
    allow: AllowSection,
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowSection {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    rules: Vec<String>,
    #[serde(default)]
    fingerprints: Vec<String>,
}

/// Minimum Shannon entropy (bits per character) by the value's character class.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyThresholds {
    pub hex: f64,
    pub alnum: f64,
    pub base64: f64,
    pub ascii: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum EntropySpec {
    Bits(f64),
    Class(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    id: String,
    description: String,
    #[serde(default = "default_family")]
    family: String,
    regex: String,
    #[serde(default)]
    group: Option<usize>,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    entropy: Option<EntropySpec>,
    #[serde(default)]
    min_len: Option<usize>,
    #[serde(default)]
    generic: bool,
    #[serde(default)]
    paths: Vec<String>,
}

fn default_family() -> String {
    "custom".into()
}

/// How much entropy a rule's value needs.
#[derive(Debug, Clone, Copy)]
pub enum EntropyMin {
    Bits(f64),
    ByClass,
}

/// One compiled detector.
#[derive(Debug)]
pub struct Rule {
    pub id: String,
    pub description: String,
    pub family: String,
    pub regex: regex::Regex,
    pub group: Option<usize>,
    pub keywords: Vec<String>,
    pub entropy: Option<EntropyMin>,
    pub min_len: usize,
    pub generic: bool,
    pub paths: Vec<Glob>,
}

/// Every rule, the entropy thresholds and the allowlist.
#[derive(Debug)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub thresholds: EntropyThresholds,
    pub allow: Allow,
}

impl RuleSet {
    /// The built-in rules.
    pub fn builtin() -> Result<RuleSet, ScanError> {
        RuleSet::load(None)
    }

    /// The built-in rules with `user` (a rules file's text) merged over them:
    /// a rule with a built-in id replaces it, new ids are added, `[allow]`
    /// lists are appended, `[entropy]` replaces the thresholds.
    pub fn load(user: Option<(&str, &str)>) -> Result<RuleSet, ScanError> {
        let base = parse(BUILTIN_RULES, "built-in rules.toml")?;
        let mut thresholds = base.entropy.ok_or_else(|| ScanError::Rules {
            source_name: "built-in rules.toml".into(),
            message: "missing [entropy]".into(),
        })?;
        let mut specs: BTreeMap<String, (usize, RuleSpec)> = BTreeMap::new();
        for (i, r) in base.rule.into_iter().enumerate() {
            specs.insert(r.id.clone(), (i, r));
        }
        let mut allow = base.allow;
        if let Some((text, name)) = user {
            let extra = parse(text, name)?;
            if let Some(t) = extra.entropy {
                thresholds = t;
            }
            let mut next = specs.len();
            for r in extra.rule {
                let pos = specs.get(&r.id).map(|(i, _)| *i).unwrap_or_else(|| {
                    next += 1;
                    next
                });
                specs.insert(r.id.clone(), (pos, r));
            }
            allow.paths.extend(extra.allow.paths);
            allow.rules.extend(extra.allow.rules);
            allow.fingerprints.extend(extra.allow.fingerprints);
        }
        let mut ordered: Vec<(usize, RuleSpec)> = specs.into_values().collect();
        ordered.sort_by_key(|(i, _)| *i);
        let rules = ordered
            .into_iter()
            .map(|(_, s)| compile(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RuleSet {
            rules,
            thresholds,
            allow: Allow::new(allow.paths, allow.rules, allow.fingerprints)?,
        })
    }

    /// The minimum entropy for `value` under `rule`, if the rule has one.
    pub fn entropy_min(&self, rule: &Rule, value: &str) -> Option<f64> {
        match rule.entropy? {
            EntropyMin::Bits(b) => Some(b),
            EntropyMin::ByClass => Some(match char_class(value) {
                CharClass::Hex => self.thresholds.hex,
                CharClass::Alnum => self.thresholds.alnum,
                CharClass::Base64 => self.thresholds.base64,
                CharClass::Ascii => self.thresholds.ascii,
            }),
        }
    }
}

fn parse(text: &str, name: &str) -> Result<RulesFile, ScanError> {
    toml::from_str(text).map_err(|e| ScanError::Rules {
        source_name: name.into(),
        message: e.to_string(),
    })
}

fn compile(s: RuleSpec) -> Result<Rule, ScanError> {
    let bad = |message: String| ScanError::Rules {
        source_name: format!("rule {}", s.id),
        message,
    };
    let regex = regex::RegexBuilder::new(&s.regex)
        .size_limit(50 << 20)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    if let Some(g) = s.group {
        if g >= regex.captures_len() {
            return Err(bad(format!("group {g} does not exist in the regex")));
        }
    }
    let entropy = match &s.entropy {
        None => None,
        Some(EntropySpec::Bits(b)) => Some(EntropyMin::Bits(*b)),
        Some(EntropySpec::Class(c)) if c == "class" => Some(EntropyMin::ByClass),
        Some(EntropySpec::Class(c)) => {
            return Err(bad(format!(
                "entropy = {c:?}: expected a number or \"class\""
            )))
        }
    };
    let paths = s
        .paths
        .iter()
        .map(|p| Glob::new(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule {
        keywords: s.keywords.iter().map(|k| k.to_ascii_lowercase()).collect(),
        id: s.id,
        description: s.description,
        family: s.family,
        regex,
        group: s.group,
        entropy,
        min_len: s.min_len.unwrap_or(1),
        generic: s.generic,
        paths,
    })
}

/// The smallest character class holding every character of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CharClass {
    Hex,
    Alnum,
    Base64,
    Ascii,
}

pub fn char_class(value: &str) -> CharClass {
    if value.bytes().all(|b| b.is_ascii_hexdigit()) {
        CharClass::Hex
    } else if value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        CharClass::Alnum
    } else if value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
    {
        CharClass::Base64
    } else {
        CharClass::Ascii
    }
}

/// Shannon entropy in bits per character.
pub fn shannon_entropy(value: &str) -> f64 {
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for b in value.bytes() {
        counts[b as usize] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let n = f64::from(n);
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}
