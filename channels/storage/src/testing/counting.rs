//! [`CountingProxy`]: counts the HTTP requests an S3 or DynamoDB client sends to a real server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy on loopback in front of a real HTTP/1.1 server (s3s-fs, dynalite) that forwards
/// everything unchanged and counts the requests it sees, by operation: DynamoDB's by their
/// `X-Amz-Target` (`GetItem`, `UpdateItem`, …), S3's by method and path-style target
/// (`PutObject`, `GetObject`, `HeadBucket`, `ListObjects`, `DeleteObject`, `UploadPart`, …;
/// see [`s3_operation`]). So a test can compare a mailbox's request counters with what the
/// server was actually asked. It only ever connects to the `upstream` it was given.
#[derive(Debug)]
pub struct CountingProxy {
    addr: SocketAddr,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`. Must be called
    /// inside a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<CountingProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let c = Arc::clone(&counts);
        let accept = tokio::spawn(async move {
            // Ends when the proxy is dropped (the task is aborted).
            while let Ok((client, _)) = listener.accept().await {
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        relay(client, server, &c).await;
                    }
                });
            }
        });
        Ok(CountingProxy {
            addr,
            counts,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests seen so far, by operation name.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests seen so far of operation `op` (0 if none).
    pub fn count(&self, op: &str) -> u64 {
        self.counts().get(op).copied().unwrap_or(0)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Forwards both ways until either side closes, parsing the client's side into requests.
async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    counts: &Mutex<BTreeMap<String, u64>>,
) {
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    let mut parser = Requests::default();
    // Bounded by the connections' lifetimes: every round moves bytes or ends.
    loop {
        tokio::select! {
            r = client.read(&mut up) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                for op in parser.feed(&up[..n]) {
                    *counts.lock().unwrap_or_else(|e| e.into_inner()).entry(op).or_insert(0) += 1;
                }
                if server.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            r = server.read(&mut down) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                if client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Where the parser is in the client's byte stream.
#[derive(Debug, Default)]
enum State {
    /// Reading a request line and headers.
    #[default]
    Head,
    /// Skipping this many body bytes.
    Body(usize),
    /// Reading a chunk-size line of a chunked body.
    ChunkSize,
    /// Skipping a chunk's data and its CRLF.
    ChunkData(usize),
    /// Reading trailer lines after the last chunk, up to an empty line.
    Trailer,
}

/// An incremental HTTP/1.1 request framer: enough of RFC 9112 (Content-Length and chunked
/// bodies) to find where each request starts on a keep-alive connection.
#[derive(Debug, Default)]
struct Requests {
    buf: Vec<u8>,
    state: State,
}

impl Requests {
    /// Takes more bytes; returns the operations of the requests whose heads completed.
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut ops = Vec::new();
        // Each round consumes bytes or waits for more, so the loop is bounded by the buffer.
        loop {
            match self.state {
                State::Head => {
                    let Some(end) = find(&self.buf, b"\r\n\r\n") else {
                        break;
                    };
                    let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                    self.buf.drain(..end + 4);
                    let (op, body) = parse_head(&head);
                    ops.push(op);
                    self.state = body;
                }
                State::Body(n) => {
                    let k = n.min(self.buf.len());
                    self.buf.drain(..k);
                    if k < n {
                        self.state = State::Body(n - k);
                        break;
                    }
                    self.state = State::Head;
                }
                State::ChunkSize => {
                    let Some(end) = find(&self.buf, b"\r\n") else {
                        break;
                    };
                    let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                    self.buf.drain(..end + 2);
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16).unwrap_or(0);
                    self.state = if size == 0 {
                        State::Trailer
                    } else {
                        State::ChunkData(size + 2)
                    };
                }
                State::ChunkData(n) => {
                    let k = n.min(self.buf.len());
                    self.buf.drain(..k);
                    if k < n {
                        self.state = State::ChunkData(n - k);
                        break;
                    }
                    self.state = State::ChunkSize;
                }
                State::Trailer => {
                    let Some(end) = find(&self.buf, b"\r\n") else {
                        break;
                    };
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        self.state = State::Head;
                    }
                }
            }
        }
        ops
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The operation a request head names, and how its body is framed.
fn parse_head(head: &str) -> (String, State) {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let mut length = 0usize;
    let mut chunked = false;
    let mut amz_target = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().unwrap_or(0),
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "x-amz-target" => amz_target = Some(value.to_owned()),
            _ => {}
        }
    }
    let op = match amz_target {
        // `DynamoDB_20120810.GetItem` → `GetItem`.
        Some(t) => t.rsplit('.').next().unwrap_or(&t).to_owned(),
        None => s3_operation(method, target).to_owned(),
    };
    let body = if chunked {
        State::ChunkSize
    } else if length > 0 {
        State::Body(length)
    } else {
        State::Head
    };
    (op, body)
}

/// The S3 operation of a path-style request (`/bucket` or `/bucket/key`, with its query).
pub fn s3_operation(method: &str, target: &str) -> &'static str {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let has = |name: &str| {
        query
            .split('&')
            .any(|kv| kv.split('=').next() == Some(name))
    };
    // `/bucket` or `/bucket/` names the bucket; anything after it is a key.
    let object = path
        .trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(_, key)| !key.is_empty());
    match (method, object) {
        ("HEAD", false) => "HeadBucket",
        ("HEAD", true) => "HeadObject",
        ("GET", false) => "ListObjects",
        ("GET", true) if has("uploadId") => "ListParts",
        ("GET", true) => "GetObject",
        ("PUT", false) => "CreateBucket",
        ("PUT", true) if has("partNumber") => "UploadPart",
        ("PUT", true) => "PutObject",
        ("DELETE", false) => "DeleteBucket",
        ("DELETE", true) if has("uploadId") => "AbortMultipartUpload",
        ("DELETE", true) => "DeleteObject",
        ("POST", false) if has("delete") => "DeleteObjects",
        ("POST", true) if has("uploads") => "CreateMultipartUpload",
        ("POST", true) if has("uploadId") => "CompleteMultipartUpload",
        _ => "Other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_alive_requests_with_both_body_kinds() {
        let mut r = Requests::default();
        let a = b"PUT /b/k1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let b = b"POST / HTTP/1.1\r\nX-Amz-Target: DynamoDB_20120810.UpdateItem\r\n\
                  Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let c = b"GET /b/k1?x-id=GetObject HTTP/1.1\r\n\r\n";
        let all: Vec<u8> = [&a[..], &b[..], &c[..]].concat();
        // Fed in awkward pieces: one byte, then the rest in 7-byte slices.
        let mut ops = r.feed(&all[..1]);
        for piece in all[1..].chunks(7) {
            ops.extend(r.feed(piece));
        }
        assert_eq!(ops, ["PutObject", "UpdateItem", "GetObject"]);
    }

    #[test]
    fn names_s3_operations() {
        assert_eq!(s3_operation("HEAD", "/bucket"), "HeadBucket");
        assert_eq!(
            s3_operation("GET", "/bucket?list-type=2&prefix=a"),
            "ListObjects"
        );
        assert_eq!(s3_operation("GET", "/bucket/a/b"), "GetObject");
        assert_eq!(
            s3_operation("PUT", "/bucket/a?partNumber=2&uploadId=x"),
            "UploadPart"
        );
        assert_eq!(s3_operation("POST", "/bucket?delete"), "DeleteObjects");
        assert_eq!(
            s3_operation("POST", "/bucket/a?uploads"),
            "CreateMultipartUpload"
        );
        assert_eq!(s3_operation("DELETE", "/bucket/a"), "DeleteObject");
    }
}
