//! The peer-comparable scenario: many callers, one event per PublishEvents
//! call, one signed webhook, measured end to end (first call to last
//! delivery), the way webhook services are usually measured side by side.
//! In the same run, the raw gRPC ceiling: the same load generator against a
//! minimal tonic server in this process that answers PublishEvents at once
//! (no storage, no delivery).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use webhook_router::proto::v1 as pb;
use webhook_router::proto::v1::event_ingest_server::{EventIngest, EventIngestServer};

use crate::router::{self, Ingest};

/// Connections the callers share, as in the cited peer runs.
pub const CONNECTIONS: usize = 4;

/// Runs `calls` one-event PublishEvents calls from `callers` concurrent
/// callers over `clients` (round robin); `make` builds call number `i`.
/// Returns the time from the first call to the last answer and every
/// call's latency in µs.
pub async fn drive(
    clients: &[Ingest],
    calls: u64,
    callers: usize,
    make: impl Fn(u64) -> pb::PublishEventsRequest + Send + Sync + 'static,
) -> (Duration, Vec<u64>) {
    let next = Arc::new(AtomicU64::new(0));
    let make = Arc::new(make);
    let acks = Arc::new(Mutex::new(Vec::with_capacity(calls as usize)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for c in 0..callers {
        let mut client = clients[c % clients.len()].clone();
        let (next, make, acks) = (next.clone(), make.clone(), acks.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= calls {
                    break;
                }
                let sent = Instant::now();
                client.publish_events(make(i)).await.expect("publish");
                mine.push(sent.elapsed().as_micros() as u64);
            }
            acks.lock().expect("acks").extend(mine);
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
    let took = started.elapsed();
    let v = std::mem::take(&mut *acks.lock().expect("acks"));
    (took, v)
}

/// A PublishEvents server that stores nothing and answers at once.
struct Answer;

#[tonic::async_trait]
impl EventIngest for Answer {
    async fn publish_events(
        &self,
        req: Request<pb::PublishEventsRequest>,
    ) -> Result<Response<pb::PublishEventsResponse>, Status> {
        let results = req
            .into_inner()
            .events
            .into_iter()
            .map(|e| pb::PublishResult {
                event_id: e.event_id,
                duplicate: false,
            })
            .collect();
        Ok(Response::new(pb::PublishEventsResponse { results }))
    }

    type StreamEventsStream = futures::stream::Empty<Result<pb::StreamEventsResponse, Status>>;

    async fn stream_events(
        &self,
        _req: Request<tonic::Streaming<pb::StreamEventsRequest>>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        Err(Status::unimplemented("not part of the ceiling"))
    }
}

/// Starts the ceiling server on an ephemeral loopback port.
pub async fn start_ceiling() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind ceiling");
    let addr = listener.local_addr().expect("ceiling addr");
    // TCP_NODELAY, as the router sets on its connections.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EventIngestServer::new(Answer))
            .serve_with_incoming(incoming)
            .await
            .expect("ceiling server");
    });
    addr
}

/// `CONNECTIONS` ingest clients of the server at `addr`.
pub async fn clients_of(addr: SocketAddr) -> Vec<Ingest> {
    let mut v = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        v.push(router::ingest_at(addr).await);
    }
    v
}
