//! Connection limits: idle and half-open clients, and the connection cap.

use super::*;

/// Idle and half-open clients cannot starve the others: hundreds of connections that never
/// finish a TLS handshake leave requests from a real client served, and the server closes
/// them after its handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = server().store(harness::soft()).start().await;
    let mut idle = Vec::new();
    for i in 0..300 {
        let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        if i % 2 == 0 {
            // Half a TLS record header: a slow-loris handshake.
            s.write_all(&[0x16, 0x03]).await.unwrap();
        }
        idle.push(s);
    }
    let c = srv.admin();
    let k = name("starve");
    c.create_key(&k).await.unwrap();
    for _ in 0..20 {
        c.generate_key(&k, b"").await.unwrap();
    }
    // The handshake timeout (10 s) closes every one of them.
    let mut buf = [0u8; 16];
    for s in idle.iter_mut().take(10) {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("the server must close a connection that never completes its handshake");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}

/// Past the connection limit new connections are closed at once; the server serves again
/// as soon as slots free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_excess_connections() {
    use tokio::io::AsyncReadExt;
    let srv = server()
        .store(harness::soft())
        .max_connections(8)
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(srv.addr).await.unwrap());
    }
    // Let the server accept all eight before the ninth arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ninth = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), ninth.read(&mut buf))
        .await
        .expect("the ninth connection is closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        srv.admin().status().await.is_err(),
        "no slot for a client either"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    srv.admin().status().await.unwrap();
}
