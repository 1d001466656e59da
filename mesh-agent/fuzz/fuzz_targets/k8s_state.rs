//! Kubernetes objects to the node's state (`k8s::state::build`): the input is JSON with
//! the objects the watchers would hold (`namespaces`, `pods`, `services`, `slices`,
//! `service_accounts`, `http_routes`, `grpc_routes`, each a list of API objects), decoded
//! as the watchers decode them (Services and EndpointSlices into their compact form,
//! through the k8s-openapi types). The snapshot then goes through the embedded control
//! plane's translation and the proxy's acceptance, as in `app`.
#![no_main]

use std::{path::PathBuf, sync::Arc};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::DynamicObject;
use libfuzzer_sys::fuzz_target;
use mesh_agent::enrol::k8s::{
    compact::{ServiceObj, SliceObj},
    state::{build, Cluster, Options},
};
use mesh_agent_fuzz::accept;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Objects {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    services: Vec<ServiceObj>,
    slices: Vec<SliceObj>,
    service_accounts: Vec<ServiceAccount>,
    http_routes: Vec<DynamicObject>,
    grpc_routes: Vec<DynamicObject>,
}

fn arcs<T>(v: Vec<T>) -> Vec<Arc<T>> {
    v.into_iter().map(Arc::new).collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(o) = serde_json::from_slice::<Objects>(data) else {
        return;
    };
    let cluster = Cluster {
        namespaces: arcs(o.namespaces),
        pods: arcs(o.pods),
        services: arcs(o.services),
        slices: arcs(o.slices),
        service_accounts: arcs(o.service_accounts),
        http_routes: arcs(o.http_routes),
        grpc_routes: arcs(o.grpc_routes),
    };
    let opts = Options {
        excludes: &[],
        trust_domain: "cluster.local",
    };
    // Every other pod's network namespace is "not found", to cover both outcomes.
    let mut found = false;
    let built = build(&cluster, &opts, &mut |_| {
        found = !found;
        if found {
            Ok(PathBuf::from("/proc/1/ns/net"))
        } else {
            Err("no such process".into())
        }
    });
    let snap = built.snapshot;
    let resources =
        mesh_agent::control::translate::Translator::default().resources(&snap.services, &snap.declared);
    let (core, nacks) = accept(&resources);
    assert!(
        nacks.is_empty(),
        "the control plane made resources its proxy refuses: {nacks:?}"
    );
    let (_config, _warming) = core.accepted.build();
});
