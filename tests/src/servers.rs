//! Several memcached servers of a test's own, to kill, restart, stop (SIGSTOP) and
//! resume: the failover tests. Never the shared test memcached, which other tests use.

use std::process::Command;
use std::time::Duration;

use tessera_protocol::config::MemcachedServer;

use crate::cluster::{Proc, free_port, memcached};
use crate::eventually;

/// memcached processes on free ports of this test's own; killed when dropped.
#[derive(Debug)]
pub struct Memcacheds {
    /// Each server's port, in configuration order.
    pub ports: Vec<u16>,
    procs: Vec<Option<Proc>>,
}

impl Memcacheds {
    /// `n` servers, each answering when this returns.
    pub fn start(n: usize) -> Memcacheds {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let procs = ports.iter().map(|&p| Some(memcached(p))).collect();
        Memcacheds { ports, procs }
    }

    /// `127.0.0.1:PORT` of each, as configured (and as the store names them).
    pub fn addrs(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The servers as `store.memcached` holds them.
    pub fn servers(&self) -> Vec<MemcachedServer> {
        self.addrs()
            .iter()
            .map(|a| a.parse().expect("a valid address"))
            .collect()
    }

    /// The index of the server `key` is placed on while all are up.
    pub fn home_of(&self, key: &str) -> usize {
        tessera_backends::memcached::place(key.as_bytes(), &self.addrs())
    }

    fn pid(&self, i: usize) -> String {
        let proc = self.procs[i].as_ref().expect("the server runs");
        proc.child.id().to_string()
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.pid(i);
        let ok = Command::new("kill").args([signal, &pid]).status();
        assert!(
            ok.is_ok_and(|s| s.success()),
            "kill {signal} memcached {pid}"
        );
    }

    /// SIGKILL: the server is gone, its port refuses connections.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut proc) = self.procs[i].take() {
            proc.kill();
        }
    }

    /// A fresh, empty server on the port of the one killed.
    pub fn restart(&mut self, i: usize) {
        assert!(self.procs[i].is_none(), "kill it first");
        self.procs[i] = Some(memcached(self.ports[i]));
    }

    /// SIGSTOP: the server hangs (connections are still accepted, nothing is answered);
    /// returns once every thread of it has stopped.
    pub async fn stop(&self, i: usize) {
        self.signal(i, "-STOP");
        let pid = self.pid(i);
        // `kill` returns before every thread has stopped: one still running could
        // answer the first calls.
        eventually(
            "every memcached thread is stopped",
            Duration::from_secs(5),
            || async { all_threads_stopped(&pid) },
        )
        .await;
    }

    /// SIGCONT: the server answers again, with everything it held.
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }
}

impl Drop for Memcacheds {
    fn drop(&mut self) {
        for proc in self.procs.iter_mut().flatten() {
            proc.kill();
        }
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc`).
pub fn all_threads_stopped(pid: &str) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}
