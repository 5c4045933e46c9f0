//! A TCP proxy that can refuse and cut connections: what a restart or a network outage of
//! PostgreSQL or SQS looks like from the worker's side.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP forwarder to `upstream`. While down it accepts and at once closes every connection
/// (the client sees its connection reset or closed), and going down cuts every live one.
pub struct Proxy {
    /// Where clients connect instead of `upstream`.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    live: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    /// Forward a fresh local port to `upstream`, up.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let live = Arc::new(Mutex::new(CancellationToken::new()));
        let (up_flag, live_tokens) = (up.clone(), live.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !up_flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = live_tokens.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { addr, up, live }
    }

    /// An outage: cut every live connection and refuse new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut live = self.live.lock().unwrap();
        live.cancel();
        *live = CancellationToken::new();
    }

    /// The outage ends: forward new connections again.
    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// PostgreSQL's address, from DATABASE_URL (port 5432 unless it says otherwise): where a
/// database proxy forwards to.
pub fn database_server() -> SocketAddr {
    let url = super::admin_database_url();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?']).next().unwrap();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    resolve(host_port, 5432)
}

/// The local DynamoDB server's address, from AWS_ENDPOINT_URL_DYNAMODB.
pub fn dynamodb_server() -> SocketAddr {
    let url = super::dynamodb_endpoint();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    resolve(after_scheme.split('/').next().unwrap(), 80)
}

/// LocalStack's address, from AWS_ENDPOINT_URL: where an SQS proxy forwards to.
pub fn sqs_server() -> SocketAddr {
    let url = super::endpoint();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    resolve(after_scheme.split('/').next().unwrap(), 80)
}

/// `host[:port]` as a socket address (the first one it resolves to).
fn resolve(host_port: &str, default_port: u16) -> SocketAddr {
    use std::net::ToSocketAddrs;
    let with_port = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("cannot resolve {with_port}"))
}
