//! A TCP proxy for fault tests: sits between shardsync and a server and,
//! on command, resets every connection, stalls them (nothing forwarded
//! either way, new connections included), or forwards only half of the
//! next server reply and then resets the link.
//!
//! It runs on its own single-threaded tokio runtime; control calls are
//! plain functions, usable from synchronous tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What every connection obeys: links of an older generation are reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Control {
    generation: u64,
    stalled: bool,
    shutdown: bool,
}

struct Shared {
    control: watch::Sender<Control>,
    /// The next server → client chunk is cut in half, then the link reset.
    cut_reply: AtomicBool,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Faults carried out: resets (incl. cut replies).
    resets: AtomicU64,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`
    /// (`127.0.0.1:port`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream.parse().expect("upstream address");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let (control, _) = watch::channel(Control::default());
        let shared = Arc::new(Shared {
            control,
            cut_reply: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        });
        let inner = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(accept_loop(listener, upstream, inner));
        });
        Proxy {
            port,
            shared,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:<proxy port>` (with `password` when given).
    pub fn url(&self, password: Option<&str>) -> String {
        match password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Resets (RST) every open connection; new ones are accepted as usual.
    pub fn reset(&self) {
        self.shared.resets.fetch_add(1, Ordering::Relaxed);
        self.shared.control.send_modify(|c| c.generation += 1);
    }

    /// Stops (`true`) or resumes forwarding on every connection.
    pub fn stall(&self, stalled: bool) {
        self.shared.control.send_modify(|c| c.stalled = stalled);
    }

    /// The next reply chunk from the server reaches the client only half,
    /// then that connection is reset.
    pub fn cut_next_reply(&self) {
        self.shared.cut_reply.store(true, Ordering::Relaxed);
    }

    /// Whether a requested reply cut is still waiting for a reply.
    pub fn cut_pending(&self) -> bool {
        self.shared.cut_reply.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.control.send_modify(|c| c.shutdown = true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: std::net::TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let listener = TcpListener::from_std(listener).expect("proxy listener");
    let mut control = shared.control.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection(client, upstream, shared.clone()));
            }
            changed = control.changed() => {
                if changed.is_err() || control.borrow().shutdown {
                    return;
                }
            }
        }
    }
}

/// How a direction of a connection ended.
#[derive(PartialEq, Eq)]
enum Ending {
    /// One side closed: the other is closed too.
    Closed,
    /// A fault (reset, cut reply, shutdown): both sides get RST.
    Reset,
}

/// One proxied connection, until either side closes or a reset.
async fn connection(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut control = shared.control.subscribe();
    let generation = control.borrow().generation;
    let _ = client.set_zero_linger();
    // Wait out a stall before even connecting upstream.
    if !wait_running(&mut control, generation).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_zero_linger();
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let ending = {
        let up = pump(&mut client_rd, &mut server_wr, &shared, false, generation);
        let down = pump(&mut server_rd, &mut client_wr, &shared, true, generation);
        tokio::select! {
            e = up => e,
            e = down => e,
        }
    };
    if ending == Ending::Reset {
        // No FIN first: closing with linger 0 sends RST.
        client_wr.forget();
        server_wr.forget();
    }
}

/// Waits while stalled; `false` when a reset or shutdown came instead.
async fn wait_running(control: &mut watch::Receiver<Control>, generation: u64) -> bool {
    loop {
        {
            let c = *control.borrow_and_update();
            if c.shutdown || c.generation != generation {
                return false;
            }
            if !c.stalled {
                return true;
            }
        }
        if control.changed().await.is_err() {
            return false;
        }
    }
}

/// Copies one direction until a close or a fault.
async fn pump(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    shared: &Shared,
    from_server: bool,
    generation: u64,
) -> Ending {
    let mut control = shared.control.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !wait_running(&mut control, generation).await {
            return Ending::Reset;
        }
        let n = tokio::select! {
            n = rd.read(&mut buf) => n,
            _ = control.changed() => continue,
        };
        let n = match n {
            Ok(0) | Err(_) => return Ending::Closed,
            Ok(n) => n,
        };
        if from_server && shared.cut_reply.swap(false, Ordering::Relaxed) {
            let _ = wr.write_all(&buf[..n.div_ceil(2)]).await;
            shared.resets.fetch_add(1, Ordering::Relaxed);
            return Ending::Reset;
        }
        // A stall or reset during the write is seen on the next round.
        if wr.write_all(&buf[..n]).await.is_err() {
            return Ending::Closed;
        }
    }
}
