//! Upstream connections: an HTTP/1.1 keep-alive pool per endpoint and one multiplexed
//! HTTP/2 connection per endpoint, on hyper's client connection API. Connections count
//! against the cluster's `max_connections`; a request that needs a connection when none
//! may be opened waits as pending (up to `max_pending_requests`).

use std::{net::SocketAddr, pin::pin, sync::Arc, time::Duration};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, Instrument};

use super::{
    lb::EndpointState,
    policy::{Counters, Gauge, Slot},
    L7Error, ProxyBody, SpanExec,
};
use crate::proxy::config::{Cluster, UpstreamProtocol};

#[derive(Debug, Default)]
pub(super) struct EndpointPool {
    idle: std::sync::Mutex<Vec<http1::SendRequest<ProxyBody>>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<ProxyBody>>>,
}

impl EndpointPool {
    /// Gives a keep-alive connection back once its response has been read to the end.
    pub fn put(&self, sender: http1::SendRequest<ProxyBody>, counters: &Counters) {
        if sender.is_closed() {
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sender);
        counters.released.notify_waiters();
    }

    fn pop(&self) -> Option<http1::SendRequest<ProxyBody>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }
}

pub(super) enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

/// A connection ready for one request; `reused` when it carried requests before (so a
/// request it failed to send may go again on a fresh one).
pub(super) struct Checkout {
    pub sender: Sender,
    pub reused: bool,
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, L7Error> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(L7Error::ConnectTimeout { addr, timeout }),
        Ok(Err(source)) => Err(L7Error::Connect { addr, source }),
        Ok(Ok(s)) => {
            // Requests are small writes; Nagle would hold them for an ACK.
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// Runs an upstream connection until it ends; its circuit-breaker slot goes with it.
fn drive<C, E>(conn: C, slot: Slot, span: tracing::Span)
where
    C: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                debug!("upstream connection ended: {e}");
            }
            drop(slot);
        }
        .instrument(span),
    );
}

async fn open(ep: &EndpointState, cluster: &Cluster, slot: Slot) -> Result<Sender, L7Error> {
    let addr = ep.address;
    let io = TokioIo::new(connect(addr, cluster.connect_timeout).await?);
    let span = tracing::debug_span!("upstream_conn", cluster = %cluster.name, %addr);
    match cluster.protocol {
        UpstreamProtocol::Http1 => {
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|source| L7Error::Handshake { addr, source })?;
            drive(conn, slot, span);
            Ok(Sender::H1(sender))
        }
        UpstreamProtocol::Http2 => {
            let (sender, conn) = http2::Builder::new(SpanExec)
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|source| L7Error::Handshake { addr, source })?;
            drive(conn, slot, span);
            Ok(Sender::H2(sender))
        }
    }
}

/// A connection to `ep` for one request.
pub(super) async fn checkout(
    counters: &Arc<Counters>,
    ep: &EndpointState,
    cluster: &Cluster,
) -> Result<Checkout, L7Error> {
    let cb = cluster.circuit_breaker;
    let overflow = |limit| L7Error::Overflow {
        cluster: cluster.name.clone(),
        limit,
    };
    if cluster.protocol == UpstreamProtocol::Http2 {
        let mut slot = ep.pool.h2.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(Checkout {
                sender: Sender::H2(s.clone()),
                reused: true,
            });
        }
        *slot = None;
        let conn = Slot::acquire(counters, Gauge::Connections, cb.max_connections)
            .ok_or_else(|| overflow("max_connections"))?;
        let Sender::H2(s) = open(ep, cluster, conn).await? else {
            unreachable!("an http2 cluster opens http2 connections")
        };
        *slot = Some(s.clone());
        return Ok(Checkout {
            sender: Sender::H2(s),
            reused: false,
        });
    }
    let mut pending = None;
    loop {
        let mut released = pin!(counters.released.notified());
        // Registered before looking, so a release between the look and the wait is seen.
        released.as_mut().enable();
        while let Some(mut s) = ep.pool.pop() {
            if !s.is_closed() && s.ready().await.is_ok() {
                return Ok(Checkout {
                    sender: Sender::H1(s),
                    reused: true,
                });
            }
        }
        if let Some(conn) = Slot::acquire(counters, Gauge::Connections, cb.max_connections) {
            drop(pending);
            return Ok(Checkout {
                sender: open(ep, cluster, conn).await?,
                reused: false,
            });
        }
        if pending.is_none() {
            pending = Some(
                Slot::acquire(counters, Gauge::Pending, cb.max_pending_requests)
                    .ok_or_else(|| overflow("max_pending_requests"))?,
            );
        }
        released.await;
    }
}
