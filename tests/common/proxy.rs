//! A TCP proxy that injects faults between a node and Redis: delay, stall (stop forwarding
//! without closing), black hole (read and drop, like a half-open path), reset (RST every open
//! connection) and a byte-rate cap. New connections follow the current mode too.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Forward as they come.
    Pass,
    /// Forward each chunk after this delay.
    Delay(Duration),
    /// Stop reading; the bytes wait in the kernel buffers, the connections stay open.
    Stall,
    /// Read and drop everything, keep the connections open.
    BlackHole,
    /// Forward at most this many bytes per second in each direction.
    Rate(u64),
}

/// One proxied connection: the client side, and the two tasks pumping bytes.
type Proxied = (Arc<TcpStream>, Vec<JoinHandle<()>>);

/// A running proxy; stops (and drops its connections) when dropped.
pub struct FaultProxy {
    pub port: u16,
    fault: Arc<Mutex<Fault>>,
    conns: Arc<Mutex<Vec<Proxied>>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target_port`.
    pub async fn start(target_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (f, c) = (fault.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                    continue;
                };
                let (client, server) = (Arc::new(client), Arc::new(server));
                let pumps = vec![
                    tokio::spawn(pump(client.clone(), server.clone(), f.clone())),
                    tokio::spawn(pump(server.clone(), client.clone(), f.clone())),
                ];
                c.lock().unwrap().push((client, pumps));
            }
        });
        FaultProxy {
            port,
            fault,
            conns,
            accept,
        }
    }

    /// Switches every connection, open and future, to `fault`.
    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Resets every open connection (the peers see a connection reset); new ones are
    /// accepted as before.
    pub fn reset(&self) {
        for (client, pumps) in self.conns.lock().unwrap().drain(..) {
            for pump in pumps {
                pump.abort();
            }
            let _ = client.set_zero_linger();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset();
    }
}

async fn pump(from: Arc<TcpStream>, to: Arc<TcpStream>, fault: Arc<Mutex<Fault>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = *fault.lock().unwrap();
        if now == Fault::Stall {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let n = match read(&from, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let current = *fault.lock().unwrap();
        match current {
            Fault::BlackHole => continue,
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Rate(bytes_per_second) => {
                let secs = n as f64 / bytes_per_second.max(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
            Fault::Pass | Fault::Stall => {}
        }
        if write_all(&to, &buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn read(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

async fn write_all(stream: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
