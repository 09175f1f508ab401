//! TLS to Redis (`rediss://`): a `redis-server` with a TLS port and
//! certificates made here with `openssl` (a CA, a server certificate for
//! 127.0.0.1, an expired one, one for another host, a client certificate,
//! and an unrelated CA). Messages cross two instances over TLS, the
//! subscription included; a certificate that must not be trusted keeps
//! the instance not ready, with the cause named in `/readyz` and the log;
//! mutual TLS works with a client certificate and is refused without; a
//! Redis Cluster whose nodes speak only TLS (`tls-cluster yes`, seeds
//! `rediss://`) carries rooms on every shard; a bad TLS option stops the
//! start, naming the file.

mod common;

use std::process::Command;

use common::cluster_process;
use common::{
    Instance, RedisServer, TIMEOUT, TempDir, free_port, run_to_exit, temp_dir, texts, unique,
    wait_for,
};

/// Certificates in a temporary directory, removed on drop.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: temp_dir("tls"),
        };
        pki.ca("ca");
        pki.ca("other-ca");
        pki.key_and_request("server", "localhost");
        pki.sign("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost");
        pki.sign(
            "wrong-host",
            "ca",
            "subjectAltName=DNS:redis.example.com,IP:10.9.9.9",
        );
        pki.expired("expired", "ca");
        pki.key_and_request("client", "chat-client");
        pki.sign("client", "ca", "extendedKeyUsage=clientAuth");
        pki
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl is not installed: apt-get install openssl");
        assert!(
            output.status.success(),
            "openssl {args:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `NAME.pem`, `NAME.key`: a self-signed CA.
    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            &format!("/CN=pubsub-chat test {name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// `NAME.key` and `NAME.csr`.
    fn key_and_request(&self, name: &str, common_name: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={common_name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
    }

    /// `NAME.pem`, signed by `ca`, with `extension`; the key is `NAME.key`
    /// if there is one, else the server's.
    fn sign(&self, name: &str, ca: &str, extension: &str) {
        let csr = self.csr_of(name);
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("{extension}\n"),
        )
        .unwrap();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &format!("{}", 1000 + name.len()),
            "-days",
            "30",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// `NAME.pem` for 127.0.0.1 with the server's key, valid only on
    /// 1 and 2 January 2020 (`openssl ca` takes the dates).
    fn expired(&self, name: &str, ca: &str) {
        std::fs::create_dir_all(self.dir.join("db")).unwrap();
        std::fs::write(self.dir.join("db/index.txt"), "").unwrap();
        std::fs::write(self.dir.join("db/serial"), "01\n").unwrap();
        std::fs::write(
            self.dir.join("ca.cnf"),
            "[ca]\ndefault_ca = test\n[test]\ndatabase = db/index.txt\nserial = db/serial\n\
             new_certs_dir = db\ndefault_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n",
        )
        .unwrap();
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        self.openssl(&[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            &format!("{ca}.pem"),
            "-keyfile",
            &format!("{ca}.key"),
            "-in",
            "server.csr",
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
            "-extfile",
            &format!("{name}.ext"),
            "-notext",
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    fn csr_of(&self, name: &str) -> String {
        if self.dir.join(format!("{name}.csr")).exists() {
            format!("{name}.csr")
        } else {
            "server.csr".into()
        }
    }

    /// The key that goes with certificate `name`.
    fn key_of(&self, name: &str) -> String {
        if self.dir.join(format!("{name}.key")).exists() {
            self.path(&format!("{name}.key"))
        } else {
            self.path("server.key")
        }
    }
}

/// A `redis-server` whose TLS port shows certificate `cert`; clients
/// must show one signed by the CA if `clients_need_certificates`.
struct TlsRedis {
    _server: RedisServer,
    tls_port: u16,
}

impl TlsRedis {
    fn start(pki: &Pki, cert: &str, clients_need_certificates: bool) -> TlsRedis {
        let tls_port = free_port().to_string();
        let (cert_file, key_file, ca_file) = (
            pki.path(&format!("{cert}.pem")),
            pki.key_of(cert),
            pki.path("ca.pem"),
        );
        let server = RedisServer::start_with(&[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert_file,
            "--tls-key-file",
            &key_file,
            "--tls-ca-cert-file",
            &ca_file,
            "--tls-auth-clients",
            if clients_need_certificates {
                "yes"
            } else {
                "no"
            },
        ]);
        TlsRedis {
            _server: server,
            tls_port: tls_port.parse().unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port)
    }
}

/// Waits until `/readyz` on the admin listener answers 503 with a body
/// holding every one of `parts`; returns the body.
fn wait_not_ready_because(instance: &Instance, parts: &[&str]) -> String {
    let mut body = String::new();
    wait_for(
        &format!("{} /readyz to name {parts:?}", instance.id),
        || {
            let (status, text) = instance.admin_get("/readyz");
            body = text;
            status == 503 && parts.iter().all(|part| body.contains(part))
        },
    );
    body
}

/// Waits until a line of the log holds every one of `parts`.
fn wait_log(instance: &Instance, parts: &[&str]) {
    wait_for(&format!("{}'s log to name {parts:?}", instance.id), || {
        instance
            .log()
            .lines()
            .any(|line| parts.iter().all(|part| line.contains(part)))
    });
}

#[test]
fn messages_cross_two_instances_over_tls() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "server", false);
    let prefix = unique("tls");
    let ca = pki.path("ca.pem");
    let options = ["--redis-ca-file", ca.as_str()];
    let a = Instance::redis_with("a", &redis.url(), &prefix, &options);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &options);
    a.wait_ready();
    b.wait_ready();
    let mut alice = a.client("alice", "tls-room");
    let mut bob = b.client("bob", "tls-room");
    alice.send("over tls", "c1");
    let got = bob.recv_messages(1).remove(0);
    assert_eq!(got["text"], "over tls", "{got}");
    bob.send("and back", "c2");
    assert_eq!(texts(&alice.recv_messages(2)), ["over tls", "and back"]);
    assert_eq!(bob.recv_messages(1)[0]["text"], "and back", "bob's own");
    // A burst: many TLS records arrive together on the subscription, more
    // than one read takes, and the reader takes them in turn.
    let long = "x".repeat(1500);
    for i in 0..200 {
        alice.send(&format!("{i} {long}"), &format!("burst-{i}"));
    }
    let burst = bob.recv_messages(200);
    for (i, message) in burst.iter().enumerate() {
        let text = message["text"].as_str().unwrap_or_default();
        assert!(
            text.starts_with(&format!("{i} ")),
            "message {i}: {text:.20}"
        );
    }
    assert!(!a.log().contains("NOT checked"), "{}", a.log());
}

#[test]
fn an_unknown_ca_is_named_and_keeps_the_instance_not_ready() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "server", false);
    let other_ca = pki.path("other-ca.pem");
    let a = Instance::redis_with(
        "a",
        &redis.url(),
        &unique("tls-ca"),
        &["--redis-ca-file", &other_ca],
    );
    let body = wait_not_ready_because(&a, &["certificate not trusted", "--redis-ca-file"]);
    assert!(body.contains("redis subscription is down"), "{body}");
    wait_log(&a, &["ERROR", "certificate not trusted", "--redis-ca-file"]);
    // --redis-tls-insecure takes it, and says so loudly.
    let b = Instance::redis_with(
        "b",
        &redis.url(),
        &unique("tls-insecure"),
        &["--redis-tls-insecure"],
    );
    b.wait_ready();
    wait_log(&b, &["WARN", "--redis-tls-insecure", "NOT checked"]);
}

#[test]
fn an_expired_certificate_is_named() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "expired", false);
    let ca = pki.path("ca.pem");
    let a = Instance::redis_with(
        "a",
        &redis.url(),
        &unique("tls-exp"),
        &["--redis-ca-file", &ca],
    );
    wait_not_ready_because(&a, &["certificate expired", "renew it"]);
    wait_log(&a, &["ERROR", "certificate expired"]);
}

#[test]
fn a_certificate_for_another_host_is_named() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "wrong-host", false);
    let ca = pki.path("ca.pem");
    let a = Instance::redis_with(
        "a",
        &redis.url(),
        &unique("tls-host"),
        &["--redis-ca-file", &ca],
    );
    wait_not_ready_because(&a, &["certificate for another host name", "127.0.0.1"]);
    wait_log(&a, &["ERROR", "certificate for another host name"]);
}

#[test]
fn mutual_tls_works_with_a_client_certificate_and_is_refused_without() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "server", true);
    let prefix = unique("tls-mutual");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let with_certificate = [
        "--redis-ca-file",
        ca.as_str(),
        "--redis-client-cert-file",
        cert.as_str(),
        "--redis-client-key-file",
        key.as_str(),
    ];
    let a = Instance::redis_with("a", &redis.url(), &prefix, &with_certificate);
    let b = Instance::redis_with("b", &redis.url(), &prefix, &with_certificate);
    a.wait_ready();
    b.wait_ready();
    let mut alice = a.client("alice", "mutual");
    let mut bob = b.client("bob", "mutual");
    alice.send("with a certificate", "c1");
    assert_eq!(bob.recv_messages(1)[0]["text"], "with a certificate");

    let c = Instance::redis_with("c", &redis.url(), &prefix, &["--redis-ca-file", &ca]);
    let body = wait_not_ready_because(&c, &["client certificate", "--redis-client-cert-file"]);
    assert!(body.contains("redis subscription is down"), "{body}");
    wait_log(&c, &["ERROR", "client certificate"]);
}

/// Three masters of a Redis Cluster whose clients, replication and
/// cluster bus all speak TLS (`tls-cluster yes`), so `CLUSTER SLOTS` asked
/// over TLS names the TLS ports. The plain port of each node (which every
/// test `redis-server` has) is for the test's own checks only.
struct TlsCluster {
    nodes: Vec<RedisServer>,
    tls_ports: Vec<u16>,
}

impl TlsCluster {
    fn start(pki: &Pki) -> TlsCluster {
        let (cert, key, ca) = (
            pki.path("server.pem"),
            pki.key_of("server"),
            pki.path("ca.pem"),
        );
        let mut nodes = Vec::new();
        let mut tls_ports = Vec::new();
        for _ in 0..3 {
            let (tls_port, bus_port) = (free_port().to_string(), free_port().to_string());
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus_port,
                "--cluster-node-timeout",
                "1000",
                "--appendonly",
                "no",
                "--tls-port",
                &tls_port,
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ]));
            tls_ports.push(tls_port.parse().unwrap());
        }
        let mut create = Command::new("redis-cli");
        create.args(["--tls", "--cacert", &ca, "--cluster", "create"]);
        create.args(tls_ports.iter().map(|p| format!("127.0.0.1:{p}")));
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = create.output().expect("redis-cli is not installed");
        assert!(
            output.status.success(),
            "redis-cli --tls --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = TlsCluster { nodes, tls_ports };
        // Masters only: cluster_process::wait_ready would wait for replicas.
        wait_for("the TLS cluster to say cluster_state:ok", || {
            cluster
                .nodes
                .iter()
                .all(|node| cluster_process::cluster_state(node.port).is_ok_and(|s| s == "ok"))
        });
        cluster
    }

    /// The seed list: every master's TLS port as `rediss://`.
    fn seeds(&self) -> String {
        self.tls_ports
            .iter()
            .map(|port| format!("rediss://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The plain port of the master that holds `key`'s slot (`CLUSTER
    /// SLOTS` asked over a plain connection names the plain ports).
    fn master_of(&self, key: &str) -> u16 {
        let port = self.nodes[0].port;
        let slot = cluster_process::key_slot(port, key).expect("CLUSTER KEYSLOT");
        cluster_process::slots(port)
            .expect("CLUSTER SLOTS")
            .iter()
            .find(|range| range.contains(slot))
            .map(|range| range.master)
            .expect("some master owns every slot")
    }
}

#[test]
fn a_tls_cluster_carries_rooms_on_every_shard() {
    let pki = Pki::new();
    let cluster = TlsCluster::start(&pki);
    let prefix = unique("tls-cluster");
    let ca = pki.path("ca.pem");
    let seeds = cluster.seeds();
    let args = [
        "--redis-cluster",
        seeds.as_str(),
        "--redis-prefix",
        prefix.as_str(),
        "--redis-ca-file",
        ca.as_str(),
    ];
    let a = Instance::start("a", &args);
    let b = Instance::start("b", &args);
    a.wait_ready();
    b.wait_ready();
    // Rooms until every master holds one: each shard's subscription and
    // publisher are reached over TLS at the port CLUSTER SLOTS gave.
    let mut rooms: Vec<(String, u16)> = Vec::new();
    for i in 0.. {
        let room = format!("r{i}");
        let master = cluster.master_of(&format!("{prefix}:room:{{{room}}}"));
        if !rooms.iter().any(|(_, m)| *m == master) {
            rooms.push((room, master));
        }
        if rooms.len() == cluster.nodes.len() {
            break;
        }
        assert!(
            i < 1000,
            "3 masters but 1000 rooms on {} of them",
            rooms.len()
        );
    }
    for (room, master) in &rooms {
        let mut alice = a.client("alice", room);
        let mut bob = b.client("bob", room);
        alice.send(&format!("to {room}"), "c1");
        let got = bob.recv_messages(1).remove(0);
        assert_eq!(
            got["text"],
            format!("to {room}"),
            "room {room} on master {master}: {got}"
        );
        bob.send("back", "c2");
        assert_eq!(
            texts(&alice.recv_messages(2)),
            [format!("to {room}"), "back".to_string()]
        );
    }
    // The same cluster behind a CA this instance does not trust: a
    // cluster instance needs the slot map to start, so it stops, the
    // cause named as for a single Redis.
    let other_ca = pki.path("other-ca.pem");
    let stderr = refused(&[
        "--redis-cluster",
        &seeds,
        "--redis-prefix",
        &prefix,
        "--redis-ca-file",
        &other_ca,
    ]);
    assert!(
        stderr.contains("certificate not trusted") && stderr.contains("--redis-ca-file"),
        "{stderr}"
    );
}

/// Runs the binary with `args` and checks that it refused to start;
/// returns what it wrote.
fn refused(args: &[&str]) -> String {
    let (status, stderr) = run_to_exit("a", args, TIMEOUT);
    assert!(!status.success(), "{args:?} was accepted:\n{stderr}");
    stderr
}

#[test]
fn bad_tls_options_stop_the_start_naming_the_file() {
    let pki = Pki::new();
    let url = format!("rediss://127.0.0.1:{}", free_port());
    let not_pem = pki.path("ca.cnf");
    let stderr = refused(&["--redis-url", &url, "--redis-ca-file", &not_pem]);
    assert!(
        stderr.contains("--redis-ca-file") && stderr.contains(&not_pem),
        "{stderr}"
    );
    let cert = pki.path("client.pem");
    let stderr = refused(&["--redis-url", &url, "--redis-client-cert-file", &cert]);
    assert!(stderr.contains("go together"), "{stderr}");
    // The server's key is not the client certificate's.
    let wrong_key = pki.path("server.key");
    let stderr = refused(&[
        "--redis-url",
        &url,
        "--redis-client-cert-file",
        &cert,
        "--redis-client-key-file",
        &wrong_key,
    ]);
    assert!(stderr.contains("--redis-client-key-file"), "{stderr}");
    let ca = pki.path("ca.pem");
    let stderr = refused(&[
        "--redis-url",
        "redis://127.0.0.1:6379",
        "--redis-ca-file",
        &ca,
    ]);
    assert!(stderr.contains("rediss://"), "{stderr}");
}
