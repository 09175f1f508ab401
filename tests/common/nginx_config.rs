//! The nginx configuration in front of several instances, as one address:
//! `/` and the probes go to the instances' HTTP ports, `/ws` to their
//! WebSocket ports, with WebSocket proxying and failover to the next
//! instance when one refuses connections. One place for it: the tests'
//! nginx (`nginx.rs`) and `scripts/run_cluster.sh` (through
//! `examples/lab.rs`) both write it from here.

use std::net::SocketAddr;
use std::path::Path;

/// The nginx configuration for instances behind `port` on loopback, each
/// given as its (HTTP, WebSocket) addresses; nginx's files in `dir`.
/// Both upstreams list every instance: a refused connection (a killed
/// instance) sends the request to the next one and takes the instance out
/// for 10 s.
pub fn config(port: u16, dir: &Path, backends: &[(SocketAddr, SocketAddr)]) -> String {
    let servers = |pick: fn(&(SocketAddr, SocketAddr)) -> SocketAddr| {
        backends
            .iter()
            .map(|b| format!("        server {} max_fails=1 fail_timeout=10s;\n", pick(b)))
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
            # With the port: the instances compare it with the page's Origin.
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
        http = servers(|b| b.0),
        ws = servers(|b| b.1),
    )
}
