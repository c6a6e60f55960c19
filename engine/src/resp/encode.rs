//! Writing RESP2 commands into a buffer, without intermediate allocations.

use bytes::{BufMut, BytesMut};

/// Appends `*<n>\r\n`.
pub fn array_header(buf: &mut BytesMut, n: usize) {
    buf.put_u8(b'*');
    buf.put_slice(itoa::Buffer::new().format(n).as_bytes());
    buf.put_slice(b"\r\n");
}

/// Appends one bulk string.
pub fn bulk(buf: &mut BytesMut, data: &[u8]) {
    buf.reserve(data.len() + 16);
    buf.put_u8(b'$');
    buf.put_slice(itoa::Buffer::new().format(data.len()).as_bytes());
    buf.put_slice(b"\r\n");
    buf.put_slice(data);
    buf.put_slice(b"\r\n");
}

/// Appends an integer as a bulk string (how commands take numbers).
pub fn bulk_int(buf: &mut BytesMut, value: i64) {
    bulk(buf, itoa::Buffer::new().format(value).as_bytes());
}

/// Appends a whole command.
pub fn command<A: AsRef<[u8]>>(buf: &mut BytesMut, args: &[A]) {
    array_header(buf, args.len());
    for arg in args {
        bulk(buf, arg.as_ref());
    }
}

/// Encodes a whole command into a fresh buffer.
pub fn to_bytes<A: AsRef<[u8]>>(args: &[A]) -> bytes::Bytes {
    let mut buf = BytesMut::new();
    command(&mut buf, args);
    buf.freeze()
}
