//! Every default of the configuration, as a named constant with its unit and the reason for
//! its value. Nothing else in the crate picks a default for a configurable value.

use std::time::Duration;

/// Address devices connect to when the file does not say: the conventional HTTPS-alt port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";

/// Most device sessions at once: 9,000. Each session holds two sockets (device and backend),
/// so 9,000 sessions stay under a 20,000 open-file limit with room for the registry, logs and
/// the admin API. Raise it with the host's `ulimit -n`, halved.
pub const DEFAULT_MAX_CONNECTIONS: usize = 9_000;

/// Time a device has to finish TLS and send its upgrade request: 10 s covers a slow cellular
/// link; a client that stalls longer is dropped so it cannot hold a connection slot.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest HTTP upgrade request (request line and headers): 8 KiB, as nginx's default
/// `large_client_header_buffers` entry.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 8 * 1024;

/// How long a session may take to finish its close handshake after a close was sent: 5 s.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Time given to sessions to close on SIGTERM/SIGINT before they are dropped: 10 s.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often CRL files are checked for changes: 30 s. SIGHUP and the admin API reload at once.
pub const DEFAULT_CRL_REFRESH: Duration = Duration::from_secs(30);

/// Time to connect (TCP, TLS and WebSocket upgrade) to one backend before trying the next: 5 s.
pub const DEFAULT_BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest WebSocket message either side may send: 64 KiB. Telemetry and commands are small;
/// tungstenite's own default (64 MiB) would let one device pin 64 MiB of gateway memory.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Largest single WebSocket frame: as large as a message, so fragmentation is optional.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// Initial read buffer per WebSocket: 1 KiB (tungstenite allocates 128 KiB per connection by
/// default and zero-fills it on each read). It grows up to a frame when a large frame arrives.
/// Every idle device holds it for as long as it is connected: 4 KiB cost about 3 KiB more RSS
/// per idle device with no measurable CPU difference for small frames (docs/benchmarks.md,
/// "Fleet scale and cost"); device reads come from rustls' plaintext buffer, not a syscall each.
pub const DEFAULT_READ_BUFFER_BYTES: usize = 1024;

/// Bytes buffered before a write goes to the socket: 16 KiB. The relay also flushes as soon as
/// its source has nothing more ready, so this only batches bursts.
pub const DEFAULT_WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Deepest nesting of arrays and maps in a frame: 16 covers any sane telemetry or command and
/// keeps decoding recursion shallow.
pub const DEFAULT_MAX_DEPTH: usize = 16;

/// Hard ceiling for `schemas.max_depth` (serde_json's own recursion limit is 128).
pub const MAX_DEPTH_LIMIT: usize = 64;

/// TLS session tickets sent after a TLS 1.3 handshake: one is enough for one reconnection.
pub const DEFAULT_TLS13_TICKETS: usize = 1;

/// Time a device has to answer a command before it is recorded as timed out: 30 s.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the heads of changed device chains are signed: 10 s. Records after the last
/// checkpoint are protected by the hash chain only.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// Payload bytes kept in an audit record (after redaction): 1 KiB.
pub const DEFAULT_AUDIT_PAYLOAD_BYTES: usize = 1024;
/// Rejected frames kept per device: 100, enough to see a pattern, small enough for sled.
pub const DEFAULT_DEAD_LETTERS_PER_DEVICE: usize = 100;
/// Payload bytes kept per rejected frame: 4 KiB (the length of the whole frame is recorded).
pub const DEFAULT_DEAD_LETTER_PAYLOAD_BYTES: usize = 4096;
/// Audit segment size before a new file is started: 64 MiB.
pub const DEFAULT_AUDIT_SEGMENT_BYTES: u64 = 64 << 20;
/// Invalid frames a device may send per window before it is disconnected: 20 per 10 s lets a
/// device with a bug report itself through error frames without flooding the backend's
/// dead-letter store.
pub const DEFAULT_INVALID_FRAME_LIMIT: u32 = 20;
pub const DEFAULT_INVALID_FRAME_WINDOW: Duration = Duration::from_secs(10);
/// Rejected frames answered with an error frame unless a route says otherwise.
pub const DEFAULT_ERROR_REPLIES: bool = true;
/// Commands a device may have open at once; more are refused (`rate-limited`) until it
/// answers or they time out: 256.
pub const DEFAULT_MAX_OPEN_COMMANDS: usize = 256;
/// Rejection log lines allowed per second, across sessions, before they are suppressed and
/// counted: 20.
pub const DEFAULT_REJECTION_LOG_LINES_PER_SECOND: u32 = 20;

/// Silence from a device after which the gateway pings it: 30 s, well inside the idle timers
/// of carrier NATs (typically 2-5 min), so a dead link is found in under a minute.
pub const DEFAULT_DEVICE_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Time a device has to answer the gateway's ping: 15 s covers a slow cellular round trip.
pub const DEFAULT_DEVICE_PING_TIMEOUT: Duration = Duration::from_secs(15);
/// Silence from a backend after which the gateway pings it: 15 s (backends are near).
pub const DEFAULT_BACKEND_PING_INTERVAL: Duration = Duration::from_secs(15);
/// Time a backend has to answer the gateway's ping: 10 s.
pub const DEFAULT_BACKEND_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Sessions with no data frame either way are kept: devices' duty cycles vary from seconds to
/// hours, and the pings already find dead links. Set `idle_timeout_ms` per route to end them.
pub const DEFAULT_IDLE_TIMEOUT: Option<Duration> = None;
/// Longest session: 24 h, so that every device authenticates again at least daily.
pub const DEFAULT_MAX_LIFETIME: Option<Duration> = Some(Duration::from_secs(24 * 3600));
/// Share of `max_lifetime` taken off at random per session: 10 %.
pub const DEFAULT_LIFETIME_JITTER_PERCENT: u8 = 10;
/// Time a side may accept no bytes while frames wait for it: 30 s.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP keepalive on both sockets of a session: first probe after 60 s idle, then every 10 s,
/// 3 probes; the kernel drops a dead peer's socket even when nothing is written to it.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const TCP_KEEPALIVE_PROBES: u32 = 3;
/// What a second session of a device on a route does unless the route says: takes over.
pub const DEFAULT_DUPLICATES: &str = "takeover";
/// Consecutive failed connects after which a backend is ejected from its pool: 3.
pub const DEFAULT_EJECT_AFTER_FAILURES: u32 = 3;
/// First ejection: 2 s; each further one in a row doubles it, up to `DEFAULT_EJECT_MAX`.
pub const DEFAULT_EJECT_BASE: Duration = Duration::from_secs(2);
/// Longest ejection: 60 s.
pub const DEFAULT_EJECT_MAX: Duration = Duration::from_secs(60);
/// Time given to open sessions to close, spread over it, on `drain`: 30 s.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Frames per second a device may send, with a burst of twice that: 100/s is far above any
/// telemetry device and still stops one faulty sensor from flooding its backend.
pub const DEFAULT_FRAMES_PER_SECOND: u32 = 100;
pub const DEFAULT_FRAMES_BURST: u32 = 200;
/// Bytes per second a device may send: 1 MiB/s, with a burst of 2 MiB (raised to the
/// largest message when that is bigger, so that every allowed message can pass).
pub const DEFAULT_BYTES_PER_SECOND: u32 = 1 << 20;
pub const DEFAULT_BYTES_BURST: u32 = 2 << 20;
/// What a frame over a rate gets unless the configuration says: `delay` (nothing is lost,
/// TCP slows the device down).
pub const DEFAULT_LIMIT_ACTION: &str = "delay";
/// Rate rejections (action `reject`) within the window that end the session with 1008.
pub const DEFAULT_ABUSE_REJECTIONS: u32 = 50;
pub const DEFAULT_ABUSE_WINDOW: Duration = Duration::from_secs(10);
/// Handshakes (TLS and upgrade request) in progress at once: 500. Beyond it a new connection
/// is closed at once, so silent TCP connections can never take session slots, and the
/// session budget plus this one (each handshake may hold a backend socket) stay under a
/// 20,000 open-file limit.
pub const DEFAULT_MAX_HANDSHAKES: usize = 500;
/// New handshakes per second from one source address, with a burst: 100/s after 1,000 at
/// once lets a whole site behind one NAT reconnect after an outage, and stops one address
/// from hammering the TLS stack.
pub const DEFAULT_SOURCE_HANDSHAKES_PER_SECOND: u32 = 100;
pub const DEFAULT_SOURCE_HANDSHAKE_BURST: u32 = 1000;
/// Connections at once from one source address: 10,000, above the session budget, so only
/// sites behind one address larger than a whole gateway need to raise it.
pub const DEFAULT_SOURCE_CONNECTIONS: u32 = 10_000;
/// Sessions one device may hold at once across all routes: 8 (with the default `takeover`
/// a device has at most one per route).
pub const DEFAULT_SESSIONS_PER_DEVICE: usize = 8;

/// JetStream replicas of every cluster bucket and stream: 3, so one NATS node can be lost
/// without losing a write (a majority of 3 acknowledges each one).
pub const DEFAULT_CLUSTER_REPLICAS: usize = 3;

/// Prefix of the cluster's bucket and stream names: several fleets can share one NATS
/// deployment under different prefixes.
pub const DEFAULT_CLUSTER_PREFIX: &str = "gatehouse";

/// How long handshakes go on from the cached registry index while NATS is unreachable: 5 min.
/// Long enough to ride out a NATS restart or a short partition; past it, a suspension made
/// elsewhere might not have reached this gateway, so new sessions are refused (503) rather
/// than admitted on a stale record.
pub const DEFAULT_CLUSTER_MAX_STALENESS: Duration = Duration::from_secs(300);

/// Lifetime of a session-ownership entry (the ownership bucket's max age): 15 s. Owners
/// refresh their entries every third of it; a gateway that dies holds its devices for at most
/// this long.
pub const DEFAULT_CLUSTER_OWNERSHIP_TTL: Duration = Duration::from_secs(15);

/// Time to reach NATS at startup, and for one request (a write, an acknowledgement): 5 s.
pub const DEFAULT_CLUSTER_TIMEOUT: Duration = Duration::from_secs(5);
