//! Field offsets of kernel structures, read from the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`): where the programs find the network
//! namespace of the interface a packet is on, on the running kernel rather
//! than on the one the object was built for.
//!
//! Written here rather than taken from a crate: aya-obj parses BTF but
//! keeps its types to itself, and btf-rs is LGPL. Only what finding a
//! member needs is read: the type table and the string table.

use std::{collections::HashMap, io, path::Path};

/// The byte offsets the programs follow (see
/// `mirror_common::GLOBAL_NETNS_SKB_DEV`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetnsPath {
    /// `struct sk_buff` → `dev`.
    pub skb_dev: u32,
    /// `struct xdp_buff` → `rxq`.
    pub xdp_rxq: u32,
    /// `struct xdp_rxq_info` → `dev`.
    pub rxq_dev: u32,
    /// `struct net_device` → `nd_net.net`.
    pub dev_net: u32,
    /// `struct net` → `net_cookie`.
    pub net_cookie: u32,
}

/// Where the kernel describes itself.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

impl NetnsPath {
    /// The offsets on the running kernel.
    pub fn of_running_kernel() -> Result<Self, BtfError> {
        Self::from_btf(&Btf::read(Path::new(VMLINUX_BTF))?)
    }

    fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let member = |parent: &'static str, path: &[&'static str]| btf.member_offset(parent, path);
        let path = Self {
            skb_dev: member("sk_buff", &["dev"])?,
            xdp_rxq: member("xdp_buff", &["rxq"])?,
            rxq_dev: member("xdp_rxq_info", &["dev"])?,
            dev_net: member("net_device", &["nd_net", "net"])?,
            net_cookie: member("net", &["net_cookie"])?,
        };
        // The programs take 0 for "not found".
        if path.net_cookie == 0 {
            return Err(BtfError::Malformed("net_cookie at offset 0"));
        }
        Ok(path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF ({VMLINUX_BTF}): {0}")]
    Read(#[source] io::Error),
    #[error("the kernel's BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("the kernel's BTF has no member {member} in struct {parent}")]
    NoMember {
        parent: &'static str,
        member: &'static str,
    },
}

const MAGIC: u16 = 0xeb9f;

// Kinds (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One member of a struct or union.
#[derive(Debug, Clone, Copy)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    /// A struct or a union, with its name.
    Composite {
        name: u32,
        members: Vec<Member>,
    },
    /// typedef, const, volatile, restrict, type tag: stands for `ty`.
    Alias {
        ty: u32,
    },
    Other,
}

/// The parsed type table (ids from 1) and string table.
struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    /// Named structs by name (the first of a name).
    structs: HashMap<String, u32>,
}

impl Btf {
    fn read(path: &Path) -> Result<Self, BtfError> {
        Self::parse(&std::fs::read(path).map_err(BtfError::Read)?)
    }

    fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |at: usize| -> Result<u16, BtfError> {
            data.get(at..at + 2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        let u32_at = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if u16_at(0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (or another byte order)"));
        }
        if data.get(2) != Some(&1) {
            return Err(BtfError::Malformed("not version 1"));
        }
        let hdr_len = u32_at(4)? as usize;
        if hdr_len < 24 {
            return Err(BtfError::Malformed("header too short"));
        }
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let range = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            data.get(start..start.checked_add(len)?)
        };
        let strings = range(str_off, str_len)
            .ok_or(BtfError::Malformed("string table out of bounds"))?
            .to_vec();
        let table = range(type_off, type_len).ok_or(BtfError::Malformed("types out of bounds"))?;
        let word = |at: usize| -> Result<u32, BtfError> {
            table
                .get(at..at + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated type"))
        };

        // Id 0 is void.
        let mut types = vec![Type::Other];
        let mut at = 0;
        while at < table.len() {
            let (name, info, size_or_type) = (word(at)?, word(at + 4)?, word(at + 8)?);
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let base = at + 12 * i;
                        let offset = word(base + 8)?;
                        members.push(Member {
                            name: word(base)?,
                            ty: word(base + 4)?,
                            // With the kind flag, the top 8 bits are a
                            // bitfield's size.
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    at += 12 * vlen;
                    Type::Composite { name, members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias { ty: size_or_type }
                }
                _ => {
                    at += match kind {
                        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                        KIND_ARRAY => 12,
                        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                        KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                        KIND_PTR | KIND_FWD | KIND_FUNC | KIND_FLOAT => 0,
                        // Its size is unknown, so is where the next type starts.
                        _ => return Err(BtfError::Malformed("a type of unknown kind")),
                    };
                    Type::Other
                }
            };
            types.push(ty);
        }
        if at != table.len() {
            return Err(BtfError::Malformed("the last type is cut"));
        }
        let mut btf = Self {
            types,
            strings,
            structs: HashMap::new(),
        };
        let mut structs = HashMap::new();
        for (id, ty) in btf.types.iter().enumerate() {
            if let Type::Composite { name, .. } = ty
                && *name != 0
            {
                structs
                    .entry(btf.string(*name).to_owned())
                    .or_insert(id as u32);
            }
        }
        btf.structs = structs;
        Ok(btf)
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// The struct or union that `id` stands for, through aliases.
    fn composite(&self, mut id: u32) -> Option<&[Member]> {
        // Alias chains are short; the bound only stops a malformed loop.
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Composite { members, .. } => return Some(members),
                Type::Alias { ty } => id = *ty,
                Type::Other => return None,
            }
        }
        None
    }

    /// Byte offset of `name` in the composite `id`, looking into anonymous
    /// members (`union { struct net_device *dev; ... }` in `sk_buff`);
    /// the member's type id with it. `budget` bounds the members looked
    /// at, whatever the nesting (a malformed table may loop).
    fn find(&self, id: u32, name: &str, depth: usize, budget: &mut usize) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        for member in self.composite(id)? {
            *budget = budget.checked_sub(1)?;
            if member.name == 0 {
                if let Some((offset, ty)) = self.find(member.ty, name, depth + 1, budget) {
                    return Some(((member.bit_offset / 8).checked_add(offset)?, ty));
                }
            } else if self.string(member.name) == name {
                return Some((member.bit_offset / 8, member.ty));
            }
        }
        None
    }

    /// Byte offset of `path` (a member, then members of it) in the struct
    /// named `parent`.
    fn member_offset(&self, parent: &'static str, path: &[&'static str]) -> Result<u32, BtfError> {
        let mut id = *self.structs.get(parent).ok_or(BtfError::NoStruct(parent))?;
        let mut total = 0;
        for member in path {
            let (offset, ty) = self
                .find(id, member, 0, &mut 100_000)
                .ok_or(BtfError::NoMember { parent, member })?;
            total = u32::checked_add(total, offset)
                .ok_or(BtfError::Malformed("an offset beyond 4 GiB"))?;
            id = ty;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `struct outer { int a; union { int b; struct inner
    /// *p; }; struct inner in; }` and `struct inner { long x; int c; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0p\0in\0inner\0x\0c\0int\0".to_vec();
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            let at = strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap();
            (at + 1) as u32
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_ne_bytes());
            }
        };
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        // 1: int
        push(&[name("int"), info(KIND_INT, 0), 4, 32]);
        // 2: struct inner { long x @0; int c @64 bits }
        push(&[name("inner"), info(KIND_STRUCT, 2), 16]);
        push(&[name("x"), 1, 0, name("c"), 1, 64]);
        // 3: pointer to inner
        push(&[0, info(2, 0), 2]);
        // 4: anonymous union { int b; inner *p; }
        push(&[0, info(KIND_UNION, 2), 8]);
        push(&[name("b"), 1, 0, name("p"), 3, 0]);
        // 5: typedef inner_t = inner (name reused; only the id matters)
        push(&[name("x"), info(KIND_TYPEDEF, 0), 2]);
        // 6: struct outer { int a @0; <union> @64 bits; inner_t in @128 bits }
        push(&[name("outer"), info(KIND_STRUCT, 3), 32]);
        push(&[name("a"), 1, 0, 0, 4, 64, name("in"), 5, 128]);
        blob(&types, &strings)
    }

    /// A version 1 BTF blob: the 24-byte header, `types`, `strings`.
    fn blob(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut blob = Vec::new();
        for w in [
            u32::from(MAGIC) | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&w.to_ne_bytes());
        }
        blob.extend_from_slice(types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn members_are_found_through_anonymous_unions_and_typedefs() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", &["a"]).unwrap(), 0);
        assert_eq!(btf.member_offset("outer", &["p"]).unwrap(), 8);
        assert_eq!(btf.member_offset("outer", &["in", "c"]).unwrap(), 16 + 8);
        assert!(matches!(
            btf.member_offset("outer", &["nope"]),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("missing", &["a"]),
            Err(BtfError::NoStruct("missing"))
        ));
    }

    #[test]
    fn truncated_or_foreign_data_is_an_error() {
        let blob = sample();
        for len in [0, 3, 20, blob.len() - 1] {
            assert!(Btf::parse(&blob[..len]).is_err(), "{len} bytes");
        }
        let mut swapped = blob.clone();
        swapped.swap(0, 1);
        assert!(Btf::parse(&swapped).is_err());
        let mut version = blob.clone();
        version[2] = 2;
        assert!(Btf::parse(&version).is_err());
        // The first type (int) made of an unknown kind: its size is unknown.
        let mut unknown = blob.clone();
        let info = 24 + 4;
        unknown[info..info + 4].copy_from_slice(&(31u32 << 24).to_ne_bytes());
        assert!(matches!(
            Btf::parse(&unknown),
            Err(BtfError::Malformed("a type of unknown kind"))
        ));
    }

    /// An anonymous member that is its own struct: the search ends.
    #[test]
    fn a_struct_that_contains_itself_ends_the_search() {
        let strings = b"\0looped\0".to_vec();
        let mut types = Vec::new();
        // 1: struct looped { <anonymous: struct looped> x 2 }
        for w in [1u32, (KIND_STRUCT << 24) | 2, 8, 0, 1, 0, 0, 1, 0] {
            types.extend_from_slice(&w.to_ne_bytes());
        }
        let btf = Btf::parse(&blob(&types, &strings)).unwrap();
        assert!(matches!(
            btf.member_offset("looped", &["nope"]),
            Err(BtfError::NoMember { .. })
        ));
    }

    #[test]
    fn the_running_kernel_says_where_the_namespace_cookie_is() {
        // Kernels without BTF exist; this one (the test machine) has it.
        if !Path::new(VMLINUX_BTF).exists() {
            return;
        }
        let path = NetnsPath::of_running_kernel().unwrap();
        // Pointers are 8-byte aligned, the cookie too.
        for offset in [
            path.skb_dev,
            path.xdp_rxq,
            path.rxq_dev,
            path.dev_net,
            path.net_cookie,
        ] {
            assert_eq!(offset % 8, 0, "{path:?}");
        }
        assert!(path.net_cookie > 0);
    }
}
