//! Attaching `mesh_tc_ingress` (inbound capture) to pods' interfaces. Interface indexes
//! and netlink are per network namespace, so every attach and detach runs on a thread
//! inside the pod's namespace (`sys::NetnsWorker`); the caller provides that thread.
//!
//! Mode: tcx links (kernel 6.6+: one `bpf_link` per interface, detached when its fd
//! closes, listed by `bpftool net`), else a clsact qdisc and a direct-action filter via
//! netlink (any kernel with `bpf_sk_assign`, 5.7+), removed explicitly on detach.

use std::{fmt, sync::Mutex};

use aya::programs::{
    links::Link as _,
    tc::{self, SchedClassifierLink, TcAttachOptions},
    LinkOrder, SchedClassifier, TcAttachType,
};
use aya::util::KernelVersion;

use super::BpfError;

/// How a program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// A tcx link (6.6+).
    Tcx,
    /// A filter on the clsact qdisc, via netlink.
    Clsact,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        })
    }
}

/// The loaded TC inbound program, shared by every attachment.
pub struct TcProgram {
    prog: Mutex<SchedClassifier>,
}

/// One attachment to one interface. Detach it (`detach_here`) or drop it on a thread in
/// the same network namespace: a clsact filter is found by interface index, which means
/// another interface in another namespace.
pub struct TcLink {
    link: Option<SchedClassifierLink>,
    pub mode: AttachMode,
    pub iface: String,
}

impl fmt::Debug for TcLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcLink")
            .field("mode", &self.mode)
            .field("iface", &self.iface)
            .finish()
    }
}

fn prog_err(what: String) -> impl FnOnce(aya::programs::ProgramError) -> BpfError {
    move |source| BpfError::Program { what, source }
}

impl TcProgram {
    /// Takes a handle of its own on the loaded program (`prog` stays with the object).
    pub(super) fn new(prog: &SchedClassifier, name: &'static str) -> Result<TcProgram, BpfError> {
        let info = prog
            .info()
            .map_err(prog_err(format!("reading the info of {name}")))?;
        let own = SchedClassifier::from_program_info(info, name.into())
            .map_err(prog_err(format!("taking a handle on {name}")))?;
        Ok(TcProgram {
            prog: Mutex::new(own),
        })
    }

    /// Attaches to ingress of `iface` of the calling thread's network namespace: tcx where
    /// the kernel has it, else clsact. Idempotent per caller: call it once per interface.
    pub fn attach_here(&self, iface: &str) -> Result<TcLink, BpfError> {
        let mut prog = self.prog.lock().unwrap_or_else(|e| e.into_inner());
        let what = |m: &str| format!("attaching mesh_tc_ingress to {iface} ingress ({m})");
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            match prog.attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(id) => {
                    let link = prog.take_link(id).map_err(prog_err(what("tcx")))?;
                    return Ok(TcLink {
                        link: Some(link),
                        mode: AttachMode::Tcx,
                        iface: iface.into(),
                    });
                }
                Err(e) => {
                    tracing::warn!(iface, error = %e, "tcx attach failed; falling back to clsact");
                }
            }
        }
        match tc::qdisc_add_clsact(iface) {
            Ok(()) => {}
            // Already there (ours from before, or another tool's): share it.
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(BpfError::Program {
                    what: what("adding the clsact qdisc"),
                    source: e.into(),
                })
            }
        }
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(Default::default()),
            )
            .map_err(prog_err(what("clsact")))?;
        let link = prog.take_link(id).map_err(prog_err(what("clsact")))?;
        Ok(TcLink {
            link: Some(link),
            mode: AttachMode::Clsact,
            iface: iface.into(),
        })
    }
}

impl TcLink {
    /// Detaches, on a thread in the interface's network namespace.
    pub fn detach_here(mut self) -> Result<(), BpfError> {
        match self.link.take() {
            Some(l) => l.detach().map_err(prog_err(format!(
                "detaching mesh_tc_ingress from {} ({})",
                self.iface, self.mode
            ))),
            None => Ok(()),
        }
    }

    /// Leaves the program attached (a tcx link then lives until the process exits; a
    /// clsact filter until the interface goes).
    pub fn leave(mut self) {
        if let Some(l) = self.link.take() {
            std::mem::forget(l);
        }
    }
}
