//! The queue after accept: connections a server accepted ahead of its
//! workers, whose requests nobody has started to read, against the
//! clients' own counts and clocks.
mod support;

use std::{
    io::Write as _,
    net::TcpStream,
    process::{Child, Command},
    time::{Duration, Instant},
};

use support::{Daemon, free_port, ss_listen_queues};

/// A server that accepts every connection at once and hands it to one
/// worker thread, which reads a request, sleeps `sleep_s` and replies:
/// the shape of threaded and event-loop servers with a busy pool.
fn accept_ahead_server(port: u16, sleep_s: f64) -> Child {
    let script = format!(
        "import socket,threading,queue,time\n\
         l=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('127.0.0.1',{port})); l.listen(64)\n\
         q=queue.Queue()\n\
         def work():\n\
         \x20   while True:\n\
         \x20       c=q.get(); c.recv(1024); time.sleep({sleep_s})\n\
         \x20       c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nok'); c.close()\n\
         threading.Thread(target=work, daemon=True).start()\n\
         while True:\n\
         \x20   c,_=l.accept(); q.put(c)\n"
    );
    let child = Command::new("python3")
        .args(["-c", &script])
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ss_listen_queues(port).is_empty() {
        assert!(Instant::now() < deadline, "the server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A client that connected and sent its request, with its clock around
/// the connect.
struct Client {
    _stream: TcpStream,
    before: Instant,
    after: Instant,
}

fn send_request(port: u16) -> Client {
    let before = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let after = Instant::now();
    stream
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("send the request");
    Client {
        _stream: stream,
        before,
        after,
    }
}

#[test]
fn unread_connections_and_the_oldest_one_match_the_clients_and_idle_ones_are_not_unread() {
    let port = free_port();
    let mut server = accept_ahead_server(port, 5.0);
    let daemon = Daemon::start();
    // 5 requests 150 ms apart: the worker reads the first and sleeps; the
    // other 4 are accepted and wait unread. A sixth client sends nothing
    // (a keep-alive connection between requests): not unread.
    let mut clients = Vec::new();
    for i in 0..5 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(150));
        }
        clients.push(send_request(port));
    }
    let _idle = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    std::thread::sleep(Duration::from_millis(400));
    let (start, m, end) = (Instant::now(), daemon.scrape(), Instant::now());
    let p = port.to_string();
    let get = |name: &str| m.get(name, &[("port", p.as_str())]);
    assert_eq!(
        m.listener("observer_listen_queue_length", port),
        0.0,
        "every connection was accepted"
    );
    assert_eq!(get("observer_connections_unread"), Some(4.0));
    let me = server.id().to_string();
    assert_eq!(
        m.get(
            "observer_worker_connections_unread",
            &[("port", p.as_str()), ("pid", me.as_str())]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.get(
            "observer_worker_active_connections",
            &[("port", p.as_str()), ("pid", me.as_str())]
        ),
        Some(6.0)
    );
    // The oldest unread is the second client's: queued when it connected.
    let oldest = get("observer_connections_unread_oldest_seconds").unwrap_or(-1.0);
    let low = start.duration_since(clients[1].after).as_secs_f64();
    let high = end.duration_since(clients[1].before).as_secs_f64();
    assert!(
        oldest >= low - 0.002 && oldest <= high + 0.002,
        "oldest unread {oldest} s; the second client connected {low}..{high} s before"
    );
    let _ = server.kill();
    let _ = server.wait();
}
