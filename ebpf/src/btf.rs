//! Byte offsets of `struct tcp_sock` fields in the running kernel, read from
//! its BTF (`/sys/kernel/btf/vmlinux`), for the kernel relay's armed checks
//! (`ARM_*` in warden-ebpf-common): the loader puts them in the program's
//! `.rodata` (`TCP_SOCK_FIELDS`), where the verifier sees them as constants
//! and checks each load against the same BTF. The layout of `tcp_sock`
//! changes between kernel versions and builds, so it is never hard-coded.
//!
//! Only the type section is walked: every BTF kind's record length is
//! fixed by the format (`Documentation/bpf/btf.rst`), and a kind this
//! walker does not know ends the walk with an error rather than a guess.

use std::fmt;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xEB9F;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// Why offsets could not be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtfError(String);

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BtfError {}

fn err(text: impl Into<String>) -> BtfError {
    BtfError(text.into())
}

/// The offsets (bytes) of `members` (direct, byte-aligned, non-bitfield
/// members) of the struct named `name` in the BTF blob `btf`, in the order
/// asked.
pub fn member_offsets(btf: &[u8], name: &str, members: &[&str]) -> Result<Vec<u32>, BtfError> {
    let u16_at = |at: usize| -> Result<u16, BtfError> {
        btf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| err("BTF shorter than its header"))
    };
    let u32_in = |data: &[u8], at: usize| -> Option<u32> {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if u16_at(0)? != MAGIC {
        return Err(err("not little-endian BTF (bad magic)"));
    }
    let header = |i: usize| u32_in(btf, 4 + 4 * i).ok_or_else(|| err("truncated BTF header"));
    let (hdr_len, type_off, type_len, str_off, str_len) =
        (header(0)?, header(1)?, header(2)?, header(3)?, header(4)?);
    let section = |off: u32, len: u32| {
        let start = (hdr_len as usize).checked_add(off as usize)?;
        btf.get(start..start.checked_add(len as usize)?)
    };
    let types = section(type_off, type_len).ok_or_else(|| err("type section out of bounds"))?;
    let strings = section(str_off, str_len).ok_or_else(|| err("string section out of bounds"))?;
    let string = |off: u32| -> &[u8] {
        let rest = strings.get(off as usize..).unwrap_or(&[]);
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    };
    let mut at = 0;
    while at < types.len() {
        let (Some(name_off), Some(info)) = (u32_in(types, at), u32_in(types, at + 4)) else {
            return Err(err("truncated type record"));
        };
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 == 1;
        let body = at + 12;
        let extra = match kind {
            2 | 7..=12 | 16 | 18 => 0,
            1 | 14 | 17 => 4,
            3 => 12,
            KIND_STRUCT | KIND_UNION | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            other => return Err(err(format!("unknown BTF kind {other}"))),
        };
        if kind == KIND_STRUCT && string(name_off) == name.as_bytes() {
            let mut found = vec![None; members.len()];
            for m in 0..vlen {
                let rec = body + 12 * m;
                let (Some(m_name), Some(m_off)) = (u32_in(types, rec), u32_in(types, rec + 8))
                else {
                    return Err(err("truncated struct member"));
                };
                let (bits, bitfield) = if kind_flag {
                    (m_off & 0xff_ffff, m_off >> 24)
                } else {
                    (m_off, 0)
                };
                if let Some(i) = members.iter().position(|n| n.as_bytes() == string(m_name)) {
                    if bitfield != 0 || bits % 8 != 0 {
                        return Err(err(format!("{name}.{} is a bitfield", members[i])));
                    }
                    found[i] = Some(bits / 8);
                }
            }
            return found
                .iter()
                .zip(members)
                .map(|(o, m)| o.ok_or_else(|| err(format!("struct {name} has no member {m}"))))
                .collect();
        }
        at = body + extra;
    }
    Err(err(format!("no struct {name} in the BTF")))
}

/// The offsets of `TCP_SOCK_FIELDS` in the running kernel, in that order.
pub fn tcp_sock_offsets() -> Result<Vec<u32>, BtfError> {
    let btf = std::fs::read(VMLINUX_BTF).map_err(|e| err(format!("reading {VMLINUX_BTF}: {e}")))?;
    let names: Vec<&str> = warden_ebpf_common::TCP_SOCK_FIELDS
        .iter()
        .map(|(_, field)| *field)
        .collect();
    let offsets = member_offsets(&btf, "tcp_sock", &names)?;
    if offsets.contains(&0) {
        // tcp_sock starts with inet_connection_sock: none of these is first.
        return Err(err("a tcp_sock field at offset 0"));
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: an int, then `struct s { a (at 4 bytes); skipped; b (at
    /// 16 bytes) }` with `kind_flag` offsets, then `struct t`.
    fn blob(bitfield_b: bool) -> Vec<u8> {
        let strings = b"\0int\0s\0a\0skipped\0b\0t\0".to_vec();
        let at = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // INT "int": size 4, then its 4-byte encoding word.
        push(&[at("int"), 1 << 24, 4, 32]);
        // STRUCT "s", kind_flag, 3 members.
        let b_off = if bitfield_b { (3 << 24) | 128 } else { 128 };
        push(&[at("s"), (1 << 31) | (4 << 24) | 3, 24]);
        push(&[at("a"), 1, 32]);
        push(&[at("skipped"), 1, 64]);
        push(&[at("b"), 1, b_off]);
        // STRUCT "t", no members.
        push(&[at("t"), 4 << 24, 0]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_member_offsets_past_other_types() {
        assert_eq!(
            member_offsets(&blob(false), "s", &["b", "a"]),
            Ok(vec![16, 4])
        );
    }

    #[test]
    fn refuses_bitfields_missing_members_and_structs() {
        assert!(member_offsets(&blob(true), "s", &["b"])
            .unwrap_err()
            .0
            .contains("bitfield"));
        assert!(member_offsets(&blob(false), "s", &["c"])
            .unwrap_err()
            .0
            .contains("no member c"));
        assert!(member_offsets(&blob(false), "u", &["a"])
            .unwrap_err()
            .0
            .contains("no struct u"));
    }

    #[test]
    fn refuses_truncated_or_foreign_blobs() {
        let whole = blob(false);
        for cut in [0, 3, 20, whole.len() - 30] {
            assert!(
                member_offsets(&whole[..cut], "s", &["a"]).is_err(),
                "cut at {cut}"
            );
        }
        let mut unknown = whole.clone();
        // The int's info word: an unknown kind 31.
        unknown[24 + 4..24 + 8].copy_from_slice(&(31u32 << 24).to_le_bytes());
        assert!(member_offsets(&unknown, "s", &["a"])
            .unwrap_err()
            .0
            .contains("unknown BTF kind"));
    }

    #[test]
    fn the_running_kernel_has_every_tcp_sock_field() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            return;
        }
        let offsets = tcp_sock_offsets().unwrap();
        assert_eq!(offsets.len(), warden_ebpf_common::TCP_SOCK_FIELDS.len());
        assert!(offsets.iter().all(|&o| o > 0 && o < 8192), "{offsets:?}");
    }
}
