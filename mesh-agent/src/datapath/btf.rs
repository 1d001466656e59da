//! Just enough of a BTF reader to find the byte offset of a struct member in the running
//! kernel (`/sys/kernel/btf/vmlinux`): our hand-rolled CO-RE for the sk_msg back-pressure
//! check, which reads `sock.sk_user_data`, `sock.sk_rcvbuf` and `sk_psock.msg_tot_len`.

use std::collections::HashMap;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF has no member {1} in struct {0}")]
    NoMember(String, String),
}

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

struct Composite {
    name_off: u32,
    members: Vec<Member>,
}

pub struct KernelBtf {
    strings: Vec<u8>,
    /// Composite types (struct/union) by type id.
    composites: HashMap<u32, Composite>,
    /// Struct type ids by name.
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl KernelBtf {
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            return Err(BtfError::Malformed(
                "bad magic (only little-endian BTF is supported)",
            ));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let mut btf = KernelBtf {
            strings,
            composites: HashMap::new(),
            structs: HashMap::new(),
        };
        let mut pos = 0;
        let mut id = 1u32;
        while pos < types.len() {
            let name_off = u32_at(types, pos)?;
            let info = u32_at(types, pos + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            pos += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,          // INT, VAR, DECL_TAG
                3 => 12,                   // ARRAY
                4 | 5 => vlen * 12,        // STRUCT, UNION
                6 | 13 => vlen * 8,        // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12,      // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF.., FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let at = pos + m * 12;
                    let off = u32_at(types, at + 8)?;
                    members.push(Member {
                        name_off: u32_at(types, at)?,
                        type_id: u32_at(types, at + 4)?,
                        bit_offset: if kind_flag { off & 0x00ff_ffff } else { off },
                    });
                }
                if kind == KIND_STRUCT && name_off != 0 {
                    let name = btf.string(name_off).to_owned();
                    btf.structs.entry(name).or_insert(id);
                }
                btf.composites.insert(id, Composite { name_off, members });
            }
            pos += extra;
            id += 1;
        }
        Ok(btf)
    }

    pub fn from_sys_fs() -> Result<Self, crate::datapath::BpfError> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux").map_err(|e| {
            crate::datapath::BpfError::Kernel(format!(
                "kernel BTF is missing (/sys/kernel/btf/vmlinux: {e}); the kernel needs CONFIG_DEBUG_INFO_BTF=y"
            ))
        })?;
        Self::parse(&data).map_err(|e| crate::datapath::BpfError::Kernel(e.to_string()))
    }

    fn string(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous members.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        self.find(id, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.into(), member.into()))
    }

    fn find(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        let c = self.composites.get(&id)?;
        let _ = c.name_off;
        for m in &c.members {
            if m.name_off != 0 && self.string(m.name_off) == member {
                return Some(m.bit_offset);
            }
        }
        if depth > 4 {
            return None;
        }
        for m in &c.members {
            if m.name_off == 0 {
                if let Some(o) = self.find(m.type_id, member, depth + 1) {
                    return Some(m.bit_offset + o);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_known_members_in_the_running_kernel() {
        // Every machine this project supports has kernel BTF; the test says so loudly.
        let data = std::fs::read("/sys/kernel/btf/vmlinux").expect("kernel BTF required");
        let btf = KernelBtf::parse(&data).unwrap();
        // sock_common is the first member of sock, so skc_family is at a small offset.
        let fam = btf.member_offset("sock_common", "skc_family").unwrap();
        assert!(fam < 64, "{fam}");
        assert!(btf.member_offset("sock", "sk_rcvbuf").unwrap() > 0);
        assert!(btf.member_offset("sock", "sk_user_data").unwrap() > 0);
        assert!(matches!(
            btf.member_offset("sock", "no_such_member"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.member_offset("no_such_struct", "x"),
            Err(BtfError::NoStruct(..))
        ));
    }
}
