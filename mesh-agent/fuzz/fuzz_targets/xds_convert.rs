//! xDS resource conversion and validation, as the proxy's xDS client runs it on what a
//! control plane sends. The first byte selects the input: 0-3 one resource of a type
//! (`Kind::ALL` order: Cluster, ClusterLoadAssignment, Listener, RouteConfiguration) in
//! a state-of-the-world response, 4 a whole SotW `DiscoveryResponse`, 5 a whole
//! `DeltaDiscoveryResponse`. Responses land on top of the configuration the features
//! file translates to, so a fuzzed resource can replace or refer to real ones; then the
//! configuration in force is assembled as after any accepted change.
#![no_main]

use std::{path::Path, sync::OnceLock};

use envoy_types::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse},
    google::protobuf::Any,
};
use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    enrol::file::MeshFile,
    proxy::xds::{
        client::{Core, Kind},
        convert::Accepted,
    },
};
use mesh_agent_fuzz::{accept, translate, FEATURES_YAML};
use prost::Message as _;

fn base() -> &'static Accepted {
    static BASE: OnceLock<Accepted> = OnceLock::new();
    BASE.get_or_init(|| {
        let file = MeshFile::parse(Path::new("features.yaml"), FEATURES_YAML).expect("features");
        let (core, nacks) = accept(&translate(&file));
        assert!(nacks.is_empty(), "{nacks:?}");
        core.accepted
    })
}

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("MESH_FUZZ_WRITE_SEEDS") {
            mesh_agent_fuzz::write_seeds(Path::new(&dir)).expect("writing seeds");
        }
        base();
    },
    |data: &[u8]| {
        let Some((&selector, rest)) = data.split_first() else {
            return;
        };
        let mut core = Core::new(false);
        core.accepted = base().clone();
        match selector % 6 {
            k @ 0..=3 => {
                let kind = Kind::ALL[usize::from(k)];
                let resp = DiscoveryResponse {
                    version_info: "2".into(),
                    nonce: "n2".into(),
                    type_url: kind.type_url(),
                    resources: vec![Any {
                        type_url: kind.type_url(),
                        value: rest.to_vec(),
                    }],
                    ..Default::default()
                };
                core.on_sotw(resp);
            }
            4 => {
                let Ok(resp) = DiscoveryResponse::decode(rest) else {
                    return;
                };
                core.on_sotw(resp);
            }
            _ => {
                let Ok(resp) = DeltaDiscoveryResponse::decode(rest) else {
                    return;
                };
                core.on_delta(resp);
            }
        }
        let (_config, _warming) = core.accepted.build();
        let _ = core.accepted.references();
    }
);
