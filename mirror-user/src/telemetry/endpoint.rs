//! `mirror run --metrics IP:PORT`: `/metrics` for Prometheus and
//! `/healthz`, over HTTP/1.1 by hyper. Every scrape reads the registry
//! (nothing is kept between scrapes). Whoever can reach the port gets
//! little: a bounded number of connections, each with a header budget and
//! a deadline; a bad request gets a 4xx and costs nothing else.

use std::{
    convert::Infallible,
    io,
    net::{SocketAddr, TcpListener as StdListener},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore, time::timeout};

use super::{prometheus, registry::Registry};

/// Connections served at once; more are closed at accept (Prometheus
/// keeps one).
const MAX_CONNECTIONS: usize = 8;
/// How long a request's head may take to arrive (a silent or slow client
/// is dropped after this).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last, however many requests it sends.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Bytes of a request head; beyond, hyper answers 431. (hyper's floor.)
const MAX_HEAD_BYTES: usize = 8192;

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot serve metrics at {addr}: {source}; pick a free address of this host for --metrics (for example 127.0.0.1:9464)"
)]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: io::Error,
}

/// Binds the endpoint's socket (before the mirror gives up root, like
/// every socket it serves).
pub fn bind(addr: SocketAddr) -> Result<StdListener, BindError> {
    let listener = StdListener::bind(addr)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .map_err(|source| BindError { addr, source })?;
    Ok(listener)
}

/// Serves until `stop` resolves.
pub async fn serve(
    listener: StdListener,
    registry: Arc<Registry>,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // A connection that went away before accept, or a full fd
                // table: the next accept may succeed.
                Err(error) => {
                    tracing::debug!("metrics: accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, Arc::clone(&registry)));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            let _ = timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served\n".to_owned(),
        ));
    }
    Ok(match request.uri().path() {
        "/metrics" => {
            // Prometheus asks for OpenMetrics first; others get the
            // classic text format.
            let open_metrics = request
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .any(|accept| {
                    accept
                        .as_bytes()
                        .starts_with(b"application/openmetrics-text")
                });
            let document = registry.document();
            let (body, content_type) = if open_metrics {
                (prometheus::encode(&document), prometheus::CONTENT_TYPE)
            } else {
                (
                    prometheus::encode_classic(&document),
                    prometheus::CLASSIC_CONTENT_TYPE,
                )
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type),
            );
            response
        }
        "/healthz" => plain(StatusCode::OK, "ok\n".to_owned()),
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: this endpoint serves /metrics and /healthz\n".to_owned(),
        ),
    })
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;
    use crate::telemetry::registry::Fixed;

    async fn request(addr: SocketAddr, head: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(head).await.unwrap();
        let mut answer = Vec::new();
        let _ = timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn serves_metrics_and_health_and_refuses_the_rest() {
        let mut registry = Registry::new();
        registry.register(
            "connections",
            Arc::new(Fixed(
                serde_json::json!({"opened": 4, "closed": {"fin": 4}}),
            )),
        );
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(registry), async move {
            let _ = stop_rx.await;
        }));

        let get =
            |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let metrics = request(addr, get("/metrics").as_bytes()).await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
        assert!(
            metrics.contains("# TYPE mirror_connections_closed_total counter"),
            "{metrics}"
        );
        let open = request(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(open.contains("application/openmetrics-text"), "{open}");
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(
            metrics.contains("mirror_connections_closed_total{reason=\"fin\"} 4"),
            "{metrics}"
        );
        let health = request(addr, get("/healthz").as_bytes()).await;
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
            "{health}"
        );
        let unknown = request(addr, get("/admin").as_bytes()).await;
        assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
        let post = request(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 << 10)
        );
        let refused = request(addr, huge.as_bytes()).await;
        assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
        let garbage = request(addr, b"\x16\x03\x01 not http\r\n\r\n").await;
        assert!(
            garbage.starts_with("HTTP/1.1 400") || garbage.is_empty(),
            "{garbage}"
        );
        // Still serving.
        let again = request(addr, get("/metrics").as_bytes()).await;
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");

        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_dropped() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(Registry::new()),
            std::future::pending(),
        ));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /metr").await.unwrap();
        let mut answer = Vec::new();
        let read = timeout(HEADER_TIMEOUT * 3, stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the half-sent request is still open");
    }
}
