//! The control socket: one versioned JSON request per connection, answered by the event
//! loop (see `blkrep_common::control`).

use crate::wake::Waker;
use blkrep_common::control::{self, ControlError, Request};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A request for the event loop and where to send its answer.
pub struct ControlCall {
    pub req: Request,
    pub reply: crossbeam_channel::Sender<Result<serde_json::Value, ControlError>>,
    /// Who asked (the control connection's peer credentials, or `signal ...`), for the
    /// event log.
    pub who: Option<String>,
}

/// Bind the control socket, replacing a stale one; refuse if a daemon already answers.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another daemon already serves the control socket {}",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    Ok(UnixListener::bind(path)?)
}

/// Serve `listener` forever on a thread.
pub fn spawn(
    listener: UnixListener,
    path: PathBuf,
    tx: crossbeam_channel::Sender<ControlCall>,
    waker: Waker,
) {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let tx = tx.clone();
                let waker = waker.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve(stream, tx, waker));
            }
            tracing::warn!("control socket {} closed", path.display());
        })
        .expect("spawn control thread");
}

fn serve(stream: UnixStream, tx: crossbeam_channel::Sender<ControlCall>, waker: Waker) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let result = match control::parse_request(line.trim_end()) {
        Err(e) => Err(e),
        Ok(req) => {
            let (rtx, rrx) = crossbeam_channel::bounded(1);
            let who = crate::events::peer_of(&stream);
            if tx
                .send(ControlCall {
                    req,
                    reply: rtx,
                    who,
                })
                .is_err()
            {
                Err(ControlError::new("shutting_down", "the daemon is stopping"))
            } else {
                waker.wake();
                rrx.recv_timeout(Duration::from_secs(60))
                    .unwrap_or_else(|_| {
                        Err(ControlError::new(
                            "timeout",
                            "the daemon did not answer in time",
                        ))
                    })
            }
        }
    };
    let mut out = control::encode_response(result);
    out.push('\n');
    let mut w = &stream;
    let _ = w.write_all(out.as_bytes());
}
