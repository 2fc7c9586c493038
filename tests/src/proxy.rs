//! A TCP proxy on loopback that a test can cut, as a network partition
//! cuts one process off a server: every connection through it is dropped
//! and new ones are refused until it heals. Stops on Drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug)]
pub struct CuttableProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// Bumped at each cut: connections open then end.
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    /// Forwards 127.0.0.1:<port> to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let (cut, generation) = (cut.clone(), generation.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // Dropped: refused while cut.
                    }
                    let mut ended = generation.subscribe();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                            return;
                        };
                        let (mut client, mut server) = (client, server);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = ended.changed() => {}
                        }
                    });
                }
            }
        });
        CuttableProxy {
            port,
            cut,
            generation,
            task,
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
