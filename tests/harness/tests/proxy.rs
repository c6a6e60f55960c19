//! The fault proxy does what fault tests rely on, against a real server:
//! it forwards, a reset breaks open links (new ones work), a stall holds
//! replies until it ends, a cut reply arrives half and then the link dies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use harness::proxy::Proxy;
use harness::RedisServer;

fn connect(proxy: &Proxy) -> TcpStream {
    let s = TcpStream::connect(proxy.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Sends PING, returns what came back before the link ended or 5 s.
fn ping(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(buf[..n].to_vec())
}

#[test]
fn forwards_and_a_reset_breaks_open_links_only() {
    let server = RedisServer::start();
    let proxy = Proxy::start(&server.addr());
    let mut a = connect(&proxy);
    assert_eq!(ping(&mut a).unwrap(), b"+PONG\r\n");
    proxy.reset();
    std::thread::sleep(Duration::from_millis(100));
    let err = ping(&mut a).and_then(|_| ping(&mut a));
    assert!(
        matches!(&err, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{err:?}"
    );
    let mut b = connect(&proxy);
    assert_eq!(ping(&mut b).unwrap(), b"+PONG\r\n");
    assert_eq!(proxy.accepted(), 2);
}

#[test]
fn a_stall_holds_replies_until_it_ends() {
    let server = RedisServer::start();
    let proxy = Proxy::start(&server.addr());
    let mut a = connect(&proxy);
    assert_eq!(ping(&mut a).unwrap(), b"+PONG\r\n");
    proxy.stall(true);
    a.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let held = ping(&mut a);
    assert!(
        matches!(&held, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{held:?}"
    );
    proxy.stall(false);
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 7];
    a.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
}

#[test]
fn a_cut_reply_arrives_half_and_the_link_dies() {
    let server = RedisServer::start();
    let proxy = Proxy::start(&server.addr());
    let mut a = connect(&proxy);
    proxy.cut_next_reply();
    a.write_all(b"ECHO 0123456789\r\n").unwrap();
    let mut got = Vec::new();
    let end = a.read_to_end(&mut got);
    assert!(end.is_err(), "reset, not a clean close: {end:?}");
    assert_eq!(
        got, b"$10\r\n0123",
        "9 of the 17 bytes of `$10\\r\\n0123456789\\r\\n`"
    );
    assert!(!proxy.cut_pending());
}
