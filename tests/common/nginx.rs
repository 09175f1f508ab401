//! An nginx of the test's own in front of several instances, as one
//! address: `/` and the probes go to the instances' HTTP ports, `/ws` to
//! their WebSocket ports, with WebSocket proxying and failover to the next
//! instance when one refuses connections.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Instance, TempDir, free_port, temp_dir};

pub struct Nginx {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: TempDir,
}

/// The nginx configuration for `instances` behind `port`. The same shape
/// as `scripts/run_cluster.sh` writes.
pub fn config(port: u16, dir: &std::path::Path, instances: &[&Instance]) -> String {
    let servers = |pick: fn(&Instance) -> SocketAddr| {
        instances
            .iter()
            .map(|i| format!("        server {} max_fails=1 fail_timeout=10s;\n", pick(i)))
            .collect::<String>()
    };
    let dir = dir.display();
    format!(
        r#"daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream chat_http {{
{http}    }}
    upstream chat_ws {{
{ws}    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_connect_timeout 1s;
        proxy_next_upstream error timeout http_502 http_503;
        location /ws {{
            proxy_pass http://chat_ws;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
        location / {{
            proxy_pass http://chat_http;
        }}
    }}
}}
"#,
        http = servers(|i| i.http),
        ws = servers(|i| i.ws),
    )
}

impl Nginx {
    pub fn start(instances: &[&Instance]) -> Self {
        let dir = temp_dir("nginx");
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(port, &dir, instances)).unwrap();
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
