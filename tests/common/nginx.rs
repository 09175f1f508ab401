//! An nginx of the test's own in front of several instances, as one
//! address: `/` and the probes go to the instances' HTTP ports, `/ws` to
//! their WebSocket ports, with WebSocket proxying and failover to the next
//! instance when one refuses connections.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::nginx_config::config;
use super::{Instance, TempDir, free_port, temp_dir};

pub struct Nginx {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: TempDir,
}

impl Nginx {
    pub fn start(instances: &[&Instance]) -> Self {
        let dir = temp_dir("nginx");
        let port = free_port();
        let conf = dir.join("nginx.conf");
        let backends: Vec<(SocketAddr, SocketAddr)> =
            instances.iter().map(|i| (i.http, i.ws)).collect();
        std::fs::write(&conf, config(port, &dir, &backends)).unwrap();
        let nginx = if Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        };
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is not installed: run ./scripts/test.sh, or apt-get install nginx");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let nginx = Nginx {
            addr,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + super::TIMEOUT;
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
                panic!("nginx did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM, not SIGKILL: the master stops its workers first, and
            // a killed master would leave them listening.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
