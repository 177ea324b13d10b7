//! A blocking client of the control socket, for `gmdctl` and `gmdstat`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::protocol::{Command, ControlError, ErrorKind, PROTOCOL_VERSION, Request, Response};

/// How long a command may take before the client gives up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens on the socket.
    #[error(
        "gmdd is not running (nothing listens on {path}); start it with 'gmdd --config FILE', or point --socket at its socket"
    )]
    NotRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket exists but may not be used by this user.
    #[error("permission denied on {path}: the control socket is for root only")]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// Talking to the daemon failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error("{0}")]
    Daemon(ControlError),
    /// The daemon answered something this client does not understand.
    #[error("unexpected answer from gmdd: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Exit status for this error (reference: 1 bad input, 2 refused or not
    /// available, 255 system error).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Daemon(e) => e.kind.exit_code(),
            _ => ErrorKind::Internal.exit_code(),
        }
    }
}

/// A connection to gmdd.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the daemon's control socket.
    ///
    /// # Errors
    /// [`ClientError::NotRunning`] when nobody listens, or another I/O error.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning {
                    path: path.to_owned(),
                }
            }
            std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                path: path.to_owned(),
            },
            _ => ClientError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
        let io = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Client {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends a command and returns its raw result.
    ///
    /// # Errors
    /// I/O failure, or the daemon's error.
    pub fn call_value(&mut self, command: Command) -> Result<serde_json::Value, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_string(&Request {
            version: PROTOCOL_VERSION,
            command,
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).map_err(io)?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Protocol("gmdd closed the connection".into()));
        }
        let response: Response =
            serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Some(error) = response.error {
            return Err(ClientError::Daemon(error));
        }
        Ok(response.result.unwrap_or(serde_json::Value::Null))
    }

    /// Asks for the event stream and returns an iterator over its events;
    /// it ends when gmdd stops.
    ///
    /// # Errors
    /// As [`Client::call_value`].
    pub fn events(
        mut self,
    ) -> Result<impl Iterator<Item = Result<crate::protocol::Event, ClientError>>, ClientError>
    {
        self.call_value(Command::Events)?;
        let path = self.path.clone();
        self.reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(|source| ClientError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(self.reader.lines().map(move |line| {
            let line = line.map_err(|source| ClientError::Io {
                path: path.clone(),
                source,
            })?;
            serde_json::from_str(&line).map_err(|e| ClientError::Protocol(e.to_string()))
        }))
    }

    /// Sends a command and decodes its result as `T`.
    ///
    /// # Errors
    /// As [`Client::call_value`], or a result of another shape.
    pub fn call<T: DeserializeOwned>(&mut self, command: Command) -> Result<T, ClientError> {
        let value = self.call_value(command)?;
        serde_json::from_value(value).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}
