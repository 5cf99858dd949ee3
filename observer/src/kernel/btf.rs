//! Just enough of the BTF format (kernel `Documentation/bpf/btf.rst`) to find
//! the byte offset of a struct member by name, following nested and
//! anonymous members. The programs read kernel structs at these offsets, so one
//! object file runs on any kernel that has BTF.
use std::collections::HashMap;

use anyhow::{Context as _, Result, anyhow, bail, ensure};

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    /// For modifiers and typedefs: the type they refer to.
    refers_to: u32,
    members: Vec<Member>,
}

/// Parsed BTF: every type by id, and struct/union names to ids.
pub struct Btf {
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
    /// Enumerators the programs need the values of (their numbers change
    /// between kernels), by name: those starting with [`ENUMERATOR_PREFIXES`].
    enumerators: HashMap<String, i64>,
}

/// The enumerators kept: the drop reasons of `kfree_skb`.
const ENUMERATOR_PREFIXES: &[&str] = &["SKB_DROP_REASON_"];
const KIND_ENUM: u32 = 6;
const KIND_ENUM64: u32 = 19;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32> {
        let b = self
            .bytes
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| anyhow!("truncated BTF at byte {}", self.pos))?;
        self.pos += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn skip(&mut self, n: usize) {
        self.pos += n;
    }
}

fn string_at(strings: &[u8], offset: u32) -> Result<String> {
    let tail = strings
        .get(offset as usize..)
        .ok_or_else(|| anyhow!("BTF string offset {offset} out of range"))?;
    let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
    Ok(String::from_utf8_lossy(&tail[..end]).into_owned())
}

/// Bytes of extra data that follow a type record of `kind` with `vlen` entries.
fn extra_len(kind: u32, vlen: usize) -> Result<usize> {
    Ok(match kind {
        1 => 4,          // INT
        3 => 12,         // ARRAY
        6 => 8 * vlen,   // ENUM
        13 => 8 * vlen,  // FUNC_PROTO
        14 => 4,         // VAR
        15 => 12 * vlen, // DATASEC
        17 => 4,         // DECL_TAG
        19 => 12 * vlen, // ENUM64
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        KIND_STRUCT | KIND_UNION => 12 * vlen,
        other => bail!("unknown BTF kind {other}"),
    })
}

impl Btf {
    /// Reads the running kernel's BTF (or a file in the same format).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "kernel BTF not readable at {}: observer needs a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y (or pass a BTF file with --kernel.btf)",
                path.display()
            )
        })?;
        Self::parse(&bytes).with_context(|| format!("parsing BTF from {}", path.display()))
    }

    /// Parses little-endian BTF bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut header = Reader { bytes, pos: 0 };
        let magic_and_version = header.u32()?;
        ensure!(
            (magic_and_version & 0xffff) as u16 == BTF_MAGIC,
            "not BTF (bad magic; big-endian BTF is not supported)"
        );
        let header_len = header.u32()? as usize;
        let (type_off, type_len) = (header.u32()? as usize, header.u32()? as usize);
        let (str_off, str_len) = (header.u32()? as usize, header.u32()? as usize);
        let section = |off: usize, len: usize| {
            bytes
                .get(header_len + off..header_len + off + len)
                .ok_or_else(|| anyhow!("BTF section out of range"))
        };
        let type_bytes = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;

        // Type ids start at 1; id 0 is void.
        let mut types = vec![Type {
            kind: 0,
            refers_to: 0,
            members: vec![],
        }];
        let mut structs_by_name = HashMap::new();
        let mut enumerators = HashMap::new();
        let mut r = Reader {
            bytes: type_bytes,
            pos: 0,
        };
        while r.pos < type_bytes.len() {
            let name_off = r.u32()?;
            let info = r.u32()?;
            let size_or_type = r.u32()?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfield_offsets = info >> 31 == 1;
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for _ in 0..vlen {
                    let name = string_at(strings, r.u32()?)?;
                    let type_id = r.u32()?;
                    let offset = r.u32()?;
                    let bit_offset = if bitfield_offsets {
                        offset & 0x00ff_ffff
                    } else {
                        offset
                    };
                    members.push(Member {
                        name,
                        type_id,
                        bit_offset,
                    });
                }
                let name = string_at(strings, name_off)?;
                if !name.is_empty() {
                    structs_by_name.entry(name).or_insert(types.len() as u32);
                }
            } else if kind == KIND_ENUM || kind == KIND_ENUM64 {
                for _ in 0..vlen {
                    let name = string_at(strings, r.u32()?)?;
                    let low = r.u32()?;
                    let value = if kind == KIND_ENUM64 {
                        ((r.u32()? as u64) << 32 | low as u64) as i64
                    } else {
                        low as i32 as i64
                    };
                    if ENUMERATOR_PREFIXES.iter().any(|p| name.starts_with(p)) {
                        enumerators.insert(name, value);
                    }
                }
            } else {
                r.skip(extra_len(kind, vlen)?);
            }
            types.push(Type {
                kind,
                refers_to: size_or_type,
                members,
            });
        }
        Ok(Btf {
            types,
            structs_by_name,
            enumerators,
        })
    }

    /// The struct/union behind `type_id`, looking through typedefs and qualifiers.
    fn composite(&self, mut type_id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(type_id as usize)?;
            match t.kind {
                KIND_STRUCT | KIND_UNION => return Some(t),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    type_id = t.refers_to
                }
                _ => return None,
            }
        }
        None
    }

    /// Bit offset of the member called `name` in `t`, searching anonymous
    /// struct/union members too (as C does), and its type id.
    fn find_member(&self, t: &Type, name: &str) -> Option<(u32, u32)> {
        if let Some(m) = t.members.iter().find(|m| m.name == name) {
            return Some((m.bit_offset, m.type_id));
        }
        t.members
            .iter()
            .filter(|m| m.name.is_empty())
            .find_map(|anon| {
                let inner = self.composite(anon.type_id)?;
                let (bits, type_id) = self.find_member(inner, name)?;
                Some((anon.bit_offset + bits, type_id))
            })
    }

    /// The value of enumerator `name` (one of [`ENUMERATOR_PREFIXES`]'s).
    pub fn enumerator(&self, name: &str) -> Option<i64> {
        self.enumerators.get(name).copied()
    }

    /// Byte offset of `path` (e.g. `["rcvq_space", "time"]`) inside `struct name`.
    pub fn member_offset(&self, struct_name: &str, path: &[&str]) -> Result<u32> {
        let describe = || format!("{struct_name}.{}", path.join("."));
        let mut type_id = *self
            .structs_by_name
            .get(struct_name)
            .ok_or_else(|| anyhow!("struct {struct_name} not in kernel BTF"))?;
        let mut bits = 0;
        for field in path {
            let t = self
                .composite(type_id)
                .ok_or_else(|| anyhow!("{} is not a struct on this kernel", describe()))?;
            let (member_bits, member_type) = self
                .find_member(t, field)
                .ok_or_else(|| anyhow!("{} not found in this kernel's BTF", describe()))?;
            bits += member_bits;
            type_id = member_type;
        }
        ensure!(bits % 8 == 0, "{} is a bitfield", describe());
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, kind, size_or_type, members as (name, type id, bit offset)).
    type TypeSpec<'a> = (&'a str, u32, u32, &'a [(&'a str, u32, u32)]);

    /// Builds BTF bytes from type records.
    fn btf_bytes(types: &[TypeSpec]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut add = |s: &str| -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let mut type_section = Vec::new();
        for (name, kind, size_or_type, members) in types {
            let info = (kind << 24) | members.len() as u32;
            for v in [add(name), info, *size_or_type] {
                type_section.extend_from_slice(&v.to_le_bytes());
            }
            for (m_name, m_type, m_bits) in members.iter() {
                // An enumerator is (name, value); a member (name, type, offset).
                let words = if *kind == KIND_ENUM { 2 } else { 3 };
                for v in [add(m_name), *m_type, *m_bits].into_iter().take(words) {
                    type_section.extend_from_slice(&v.to_le_bytes());
                }
            }
            if *kind == 1 {
                type_section.extend_from_slice(&[0; 4]); // INT encoding word
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&(0x0001_eb9fu32).to_le_bytes());
        for v in [
            24u32,
            0,
            type_section.len() as u32,
            type_section.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&type_section);
        out.extend_from_slice(&strings);
        out
    }

    fn sample() -> Btf {
        // 1: int; 2: struct inner { int a @0; int time @64 }
        // 3: typedef inner_t -> 2; 4: union (anon) { int x @0; int hidden @0 }
        // 5: struct outer { int first @0; inner_t space @128; (anon union) @256 }
        let bytes = btf_bytes(&[
            ("int", 1, 4, &[]),
            ("inner", KIND_STRUCT, 16, &[("a", 1, 0), ("time", 1, 64)]),
            ("inner_t", KIND_TYPEDEF, 2, &[]),
            ("", KIND_UNION, 4, &[("x", 1, 0), ("hidden", 1, 0)]),
            (
                "outer",
                KIND_STRUCT,
                40,
                &[("first", 1, 0), ("space", 3, 128), ("", 4, 256)],
            ),
        ]);
        Btf::parse(&bytes).expect("sample BTF parses")
    }

    #[test]
    fn drop_reasons_are_read_by_name_and_other_enumerators_skipped() {
        let bytes = btf_bytes(&[
            (
                "skb_drop_reason",
                KIND_ENUM,
                4,
                &[
                    ("SKB_NOT_DROPPED_YET", 0, 0),
                    ("SKB_DROP_REASON_NOT_SPECIFIED", 2, 0),
                    ("SKB_DROP_REASON_TCP_CSUM", 10, 0),
                ],
            ),
            ("other", KIND_ENUM, 4, &[("OTHER_VALUE", 7, 0)]),
            ("int", 1, 4, &[]),
        ]);
        let btf = Btf::parse(&bytes).expect("parses");
        assert_eq!(btf.enumerator("SKB_DROP_REASON_TCP_CSUM"), Some(10));
        assert_eq!(btf.enumerator("SKB_DROP_REASON_NOT_SPECIFIED"), Some(2));
        assert_eq!(btf.enumerator("OTHER_VALUE"), None);
    }

    #[test]
    fn nested_member_offset_follows_typedefs() {
        assert_eq!(
            sample().member_offset("outer", &["space", "time"]).unwrap(),
            16 + 8
        );
    }

    #[test]
    fn anonymous_union_members_are_found_by_name() {
        assert_eq!(sample().member_offset("outer", &["hidden"]).unwrap(), 32);
    }

    #[test]
    fn missing_member_names_the_path() {
        let err = sample()
            .member_offset("outer", &["space", "nope"])
            .unwrap_err();
        assert!(err.to_string().contains("outer.space.nope"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(&[1, 2, 3]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0]).is_err());
    }
}
