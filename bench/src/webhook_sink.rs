//! The `webhooks` scenario's receiver: a deliberately slow webhook endpoint (every request is
//! answered 200 after [`DELAY`]) that counts requests and events, so that the fan-out measured
//! beside it shows what webhook delivery costs the data path when the backend cannot keep up.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use http_body_util::{BodyExt, Full};

/// How long the receiver takes per request.
pub const DELAY: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
pub struct Counts {
    pub requests: AtomicU64,
    pub events: AtomicU64,
}

/// A running sink; stops when dropped.
pub struct Sink {
    pub port: u16,
    pub counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start() -> Result<Sink> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let c = c.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            // One `"seq":` per event, batched or not.
                            let events = body.windows(6).filter(|w| w == b"\"seq\":").count();
                            c.requests.fetch_add(1, Ordering::Relaxed);
                            c.events.fetch_add(events as u64, Ordering::Relaxed);
                            tokio::time::sleep(DELAY).await;
                            Ok::<_, Infallible>(hyper::Response::new(
                                Full::new(bytes::Bytes::new()),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Sink { port, counts, task })
}
