//! The standalone enrolment/services file: YAML parsing and validation
//! (`MeshFile::parse`), then what the agent does with a file it accepted: the datapath
//! snapshot, the embedded control plane's translation to xDS, and the agent's own proxy
//! judging it. A NACK is allowed here: some limits are xDS-level checks by design (token
//! buckets, durations beyond a protobuf Duration, header rewrites; docs/configuration.md),
//! refused with a reason while the last good configuration stays. What must never happen
//! is a panic anywhere on the way. The incremental parser (which reparses only the
//! services whose text changed) must agree with the whole-file parse on every input, with
//! a fresh cache and with one warmed by another file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mesh_agent::enrol::{
    file::{FileParser, MeshFile},
    Snapshot,
};
use mesh_agent_fuzz::{accept, translate, FEATURES_YAML};

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("MESH_FUZZ_WRITE_SEEDS") {
            mesh_agent_fuzz::write_seeds(Path::new(&dir)).expect("writing seeds");
        }
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let path = Path::new("fuzz.yaml");
        let whole = MeshFile::parse_whole(path, text).map_err(|e| e.to_string());
        let fresh = FileParser::default().parse(path, text).map_err(|e| e.to_string());
        assert_eq!(fresh, whole, "incremental (fresh) vs whole-file parse");
        let mut warm = FileParser::default();
        let _ = warm.parse(path, FEATURES_YAML);
        let warmed = warm.parse(path, text).map_err(|e| e.to_string());
        assert_eq!(warmed, whole, "incremental (warm) vs whole-file parse");
        let Ok(file) = whole else {
            return;
        };
        let snapshot = Snapshot::from_file(&file);
        assert_eq!(snapshot.workloads.len(), file.workloads.len());
        let resources = translate(&file);
        let (core, nacks) = accept(&resources);
        // A refusal names what it refuses.
        assert!(nacks.iter().all(|n| !n.is_empty()), "{nacks:?}");
        let (_config, _warming) = core.accepted.build();
    }
);
