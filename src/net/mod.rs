//! Network plumbing of the shell: rustls server and client configurations ([`tls`]), the
//! backend WebSocket connector ([`backend`]), the session worker runtimes ([`workers`]), and
//! the tungstenite configuration built from the validated limits. No decisions live here.

pub mod backend;
pub mod tls;
pub mod workers;

use crate::config::WebSocketLimits;

/// The tungstenite configuration with every limit set explicitly.
pub fn websocket_config(
    limits: &WebSocketLimits,
) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(limits.read_buffer_bytes)
        .write_buffer_size(limits.write_buffer_bytes)
        // A queued message plus one write buffer: the relay never queues more than one
        // message per direction, so this bound is never the one that applies.
        // The slack holds the gateway's own pings and error frames queued behind it.
        .max_write_buffer_size(limits.write_buffer_bytes + limits.max_message_bytes + 4096)
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_frame_bytes))
        .accept_unmasked_frames(false)
}

/// Turns TCP keepalive on for a session's socket: first probe after `idle` without traffic,
/// then every `TCP_KEEPALIVE_INTERVAL`, `TCP_KEEPALIVE_PROBES` probes. `None` leaves it off.
pub fn keepalive(tcp: &tokio::net::TcpStream, idle: Option<std::time::Duration>) {
    let Some(idle) = idle else {
        return;
    };
    let params = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(crate::config::TCP_KEEPALIVE_INTERVAL)
        .with_retries(crate::config::TCP_KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    async fn keepalive_is_set_with_the_configured_idle_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.unwrap();
        super::keepalive(&server, Some(Duration::from_secs(42)));
        let sock = socket2::SockRef::from(&server);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            crate::config::TCP_KEEPALIVE_INTERVAL
        );
        assert_eq!(
            sock.tcp_keepalive_retries().unwrap(),
            crate::config::TCP_KEEPALIVE_PROBES
        );
        let client = client.unwrap();
        super::keepalive(&client, None);
        assert!(!socket2::SockRef::from(&client).keepalive().unwrap());
    }
}
