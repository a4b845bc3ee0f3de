//! The Redis protocol port (`resp_bind`): the agent's cache for any Redis
//! client. `GET` reads L1 then L2 exactly as `GET /v1/cache/...` does, `SET`
//! stores as `PUT` does, and `DEL` is an invalidation, as `DELETE` is; the
//! coherence is the same because every command goes through [`Agent`].
//!
//! The tenant of a connection is the user name of its `AUTH` or `HELLO ...
//! AUTH` (the password is a token's secret when `[[tokens]]` are configured),
//! or `resp_default_tenant` when the connection does not name one. A `GET`
//! that misses remembers its fill token on the connection, and the `SET` of
//! that key on the same connection sends it: a value read from the database
//! before an invalidation of the key is refused (`-ERR stale_fill: ...`), as
//! an HTTP PUT with the token would be.
//!
//! Frames are parsed by the `redis-protocol` crate. Each read from the socket
//! is decoded into every complete command it holds, the commands run in
//! order, and their replies leave in one write (pipelining costs no extra
//! syscalls).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Frame2;
use redis_protocol::resp3::types::BytesFrame as Frame3;
use shared::audit::{self, Trail};
use shared::auth::{Caller, Scope, Tokens};
use shared::protocol::Selector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentError, Put, Read};

/// Fill tokens a connection remembers (the latest misses): enough for an
/// `MGET` of a page of keys followed by their `SET`s, bounded so a client
/// that never `SET`s holds no growing memory.
const REMEMBERED_FILLS: usize = 1024;

/// Bytes a connection may buffer without completing a command: the largest
/// value plus room for the command around it.
fn max_pending_bytes(agent: &Agent) -> usize {
    agent.settings().max_value_bytes.saturating_mul(2).saturating_add(64 * 1024)
}

/// What the port needs besides the agent.
#[derive(Clone)]
pub struct Port {
    /// The cache.
    agent: Agent,
    /// The agent's tokens (none: anyone may connect, as over HTTP).
    tokens: Tokens,
    /// The tenant of a connection that names none (`resp_default_tenant`).
    default_tenant: Option<Arc<str>>,
    /// Where `DEL`s are recorded, as the HTTP `DELETE`s are.
    trail: Trail,
    /// Connection ids, for `CLIENT ID` and `HELLO`.
    next_id: Arc<AtomicU64>,
}

impl Port {
    /// A port over `agent`.
    pub fn new(agent: Agent, tokens: Tokens, default_tenant: Option<String>, trail: Trail) -> Port {
        Port {
            agent,
            tokens,
            default_tenant: default_tenant.map(Arc::from),
            trail,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Serves the port on `threads` threads of its own, each an event loop
    /// (a current-thread runtime) accepting from the same socket and serving
    /// the connections it accepted, until `stop` is cancelled. As Redis's own
    /// loop does, a connection never moves between threads: a command costs
    /// no wake-up of another thread, which on the agent's shared runtime was
    /// most of what a hit cost (futex waits and task switches, in `perf`).
    pub fn serve_on_threads(
        self,
        listener: std::net::TcpListener,
        threads: usize,
        stop: CancellationToken,
    ) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
        listener.set_nonblocking(true)?;
        let mut handles = Vec::with_capacity(threads.max(1));
        for i in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (listener, port, stop) = (listener.try_clone()?, self.clone(), stop.clone());
            let thread = std::thread::Builder::new().name(format!("resp-{i}")).spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => port.serve(listener, stop).await,
                        Err(e) => tracing::error!(error = %e, "the Redis protocol port cannot listen"),
                    }
                });
            })?;
            handles.push(thread);
        }
        Ok(handles)
    }

    /// Accepts connections until `stop` is cancelled; each connection is
    /// served by its own task (on the runtime this runs on), and closed when
    /// `stop` is cancelled.
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        loop {
            let (socket, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, say: the listener itself is fine.
                        tracing::warn!(error = %e, "the Redis protocol port could not accept a connection");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let port = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let metrics = &port.agent.inner().metrics;
                metrics.resp_connections.inc();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    result = port.connection(socket) => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "a Redis protocol connection ended");
                        }
                    }
                }
                metrics.resp_connections.dec();
            });
        }
    }

    /// Serves one connection until the client quits or breaks the protocol.
    async fn connection(&self, mut socket: TcpStream) -> std::io::Result<()> {
        socket.set_nodelay(true)?;
        let limit = max_pending_bytes(&self.agent);
        let mut session = Session::new(self.next_id.fetch_add(1, Ordering::Relaxed), self);
        let mut input = BytesMut::with_capacity(16 * 1024);
        let mut output = BytesMut::with_capacity(16 * 1024);
        loop {
            if socket.read_buf(&mut input).await? == 0 {
                return Ok(());
            }
            let mut quit = false;
            while !quit {
                let frame = match redis_protocol::resp2::decode::decode_bytes_mut(&mut input) {
                    Ok(Some((frame, _, _))) => frame,
                    Ok(None) if input.len() > limit => {
                        let error = format!("ERR Protocol error: a command of over {limit} bytes");
                        session.reply(&mut output, Reply::Error(error));
                        quit = true;
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        session.reply(&mut output, Reply::Error(format!("ERR Protocol error: {e}")));
                        quit = true;
                        break;
                    }
                };
                let reply = match command_args(frame) {
                    Some(args) if !args.is_empty() => {
                        quit = args[0].eq_ignore_ascii_case(b"QUIT");
                        self.run(&mut session, &args).await
                    }
                    _ => Reply::Error("ERR Protocol error: a command is an array of bulk strings".into()),
                };
                session.reply(&mut output, reply);
            }
            if !output.is_empty() {
                socket.write_all(&output).await?;
                output.clear();
            }
            if quit {
                return Ok(());
            }
        }
    }

    /// Runs one command.
    async fn run(&self, session: &mut Session, args: &[Bytes]) -> Reply {
        // The name in capitals, without allocating (no command is longer than 8).
        let mut buffer = [0u8; 8];
        let name: &[u8] = match buffer.get_mut(..args[0].len()) {
            Some(upper) => {
                upper.copy_from_slice(&args[0]);
                upper.make_ascii_uppercase();
                upper
            }
            None => b"",
        };
        let rest = &args[1..];
        self.agent.inner().metrics.resp_commands.count(name);
        // As in Redis: with authentication on, only these work before AUTH.
        let before_auth = matches!(name, b"AUTH" | b"HELLO" | b"QUIT");
        if self.tokens.enabled() && session.caller.is_none() && !before_auth {
            return Reply::Error("NOAUTH Authentication required.".into());
        }
        match name {
            b"PING" => match rest {
                [] => Reply::Status("PONG"),
                [message] => Reply::Bulk(message.clone()),
                _ => wrong_arity("ping"),
            },
            b"ECHO" => match rest {
                [message] => Reply::Bulk(message.clone()),
                _ => wrong_arity("echo"),
            },
            b"QUIT" => Reply::Ok,
            b"AUTH" => match rest {
                [password] => session.authenticate(None, password),
                [user, password] => session.authenticate(Some(user), password),
                _ => wrong_arity("auth"),
            },
            b"HELLO" => session.hello(rest),
            b"CLIENT" => client(session, rest),
            b"SELECT" => match rest {
                [db] if db.as_ref() == b"0" => Reply::Ok,
                [_] => Reply::Error("ERR DB index is out of range (the agent has database 0 only)".into()),
                _ => wrong_arity("select"),
            },
            // Clients ask for the command table for hints; the agent has none to give.
            b"COMMAND" => Reply::Array(Vec::new()),
            b"INFO" => Reply::Bulk(Bytes::from(info())),
            b"GET" => match rest {
                [key] => self.get(session, key).await,
                _ => wrong_arity("get"),
            },
            b"MGET" if !rest.is_empty() => {
                let mut values = Vec::with_capacity(rest.len());
                for key in rest {
                    values.push(self.get(session, key).await);
                }
                Reply::Array(values)
            }
            b"SET" if rest.len() >= 2 => self.set(session, rest).await,
            b"DEL" | b"UNLINK" if !rest.is_empty() => self.del(session, rest).await,
            b"EXISTS" if !rest.is_empty() => {
                let mut found = 0;
                for key in rest {
                    match self.read(session, key).await {
                        Ok(Some(_)) => found += 1,
                        Ok(None) => {}
                        Err(reply) => return reply,
                    }
                }
                Reply::Int(found)
            }
            b"TTL" | b"PTTL" => match rest {
                [key] => match self.read(session, key).await {
                    Ok(Some(expires_at)) => {
                        let left = expires_at.saturating_duration_since(Instant::now());
                        let left =
                            if name == b"TTL" { left.as_secs_f64().round() as i64 } else { left.as_millis() as i64 };
                        Reply::Int(left)
                    }
                    // -2: no such key (every entry has a TTL, so never -1).
                    Ok(None) => Reply::Int(-2),
                    Err(reply) => reply,
                },
                _ => wrong_arity(&String::from_utf8_lossy(name).to_ascii_lowercase()),
            },
            b"MGET" | b"SET" | b"DEL" | b"UNLINK" | b"EXISTS" => {
                wrong_arity(&String::from_utf8_lossy(name).to_ascii_lowercase())
            }
            _ => {
                let shown: String = String::from_utf8_lossy(&args[0]).chars().take(64).collect();
                Reply::Error(format!(
                    "ERR unknown command '{shown}': the agent's Redis port speaks GET, MGET, SET, DEL, UNLINK, EXISTS, \
                     TTL, PTTL and the connection commands"
                ))
            }
        }
    }

    /// `GET key`: the value, or nil with the fill token remembered.
    async fn get(&self, session: &mut Session, key: &Bytes) -> Reply {
        let (tenant, key) = match session.target(Scope::Read, key) {
            Ok(target) => target,
            Err(reply) => return reply,
        };
        // A key this connection missed before may be leased to it: it does
        // not wait for its own fill.
        let read = if session.fills.contains_key(key) {
            self.agent.peek(&tenant, key).await
        } else {
            self.agent.get(&tenant, key).await
        };
        match read {
            Ok(Read::Hit { entry, .. }) => Reply::Bulk(entry.value()),
            Ok(Read::Miss { fill_token }) => {
                session.remember_fill(key.to_string(), fill_token);
                Reply::Nil
            }
            Err(e) => agent_error(e),
        }
    }

    /// A read for `EXISTS`, `TTL` and `PTTL`: when the entry expires, if cached.
    async fn read(&self, session: &mut Session, key: &Bytes) -> Result<Option<Instant>, Reply> {
        let (tenant, key) = session.target(Scope::Read, key)?;
        // Not a load: no fill lease taken or waited for.
        match self.agent.peek(&tenant, key).await {
            Ok(Read::Hit { entry, .. }) => Ok(Some(entry.expires_at())),
            Ok(Read::Miss { fill_token }) => {
                session.remember_fill(key.to_string(), fill_token);
                Ok(None)
            }
            Err(e) => Err(agent_error(e)),
        }
    }

    /// `SET key value [EX seconds | PX milliseconds] [NX | XX]`.
    async fn set(&self, session: &mut Session, args: &[Bytes]) -> Reply {
        let options = match SetOptions::parse(&args[2..]) {
            Ok(options) => options,
            Err(reply) => return reply,
        };
        let (tenant, key) = match session.target(Scope::Write, &args[0]) {
            Ok(target) => target,
            Err(reply) => return reply,
        };
        // NX and XX look first: a read that misses gives the fill token the
        // write then carries, so NX cannot store over an invalidation either.
        if options.nx || options.xx {
            // The write follows at once: no fill lease taken or waited for.
            match self.agent.peek(&tenant, key).await {
                Ok(Read::Hit { .. }) if options.nx => return Reply::Nil,
                Ok(Read::Hit { .. }) => {}
                Ok(Read::Miss { .. }) if options.xx => return Reply::Nil,
                Ok(Read::Miss { fill_token }) => session.remember_fill(key.to_string(), fill_token),
                Err(e) => return agent_error(e),
            }
        }
        let put = Put {
            value: args[1].clone(),
            content_type: String::new(),
            ttl_secs: options.ttl_secs,
            tags: Vec::new(),
            depends_on: Vec::new(),
            fill_token: session.take_fill(key),
        };
        match self.agent.put(&tenant, key, put).await {
            Ok(()) => Reply::Ok,
            Err(e) => agent_error(e),
        }
    }

    /// `DEL key...`: an invalidation of each key everywhere (and of what
    /// depends on it); the count is of the keys that were in L2.
    async fn del(&self, session: &mut Session, keys: &[Bytes]) -> Reply {
        let mut deleted = 0;
        for key in keys {
            let (tenant, key) = match session.target(Scope::Invalidate, key) {
                Ok(target) => target,
                Err(reply) => return reply,
            };
            let outcome = self.agent.delete(&tenant, key).await;
            let selector = Selector { tenant: tenant.to_string(), keys: vec![key.to_string()], ..Selector::default() };
            let caller = session.caller.clone().unwrap_or(Caller::Anonymous);
            let entry = audit::Entry::invalidation("delete", &caller, &[selector]);
            match outcome {
                Ok(outcome) => {
                    self.trail.record(entry.answered(204, Some(outcome.position.seq), None));
                    deleted += i64::from(outcome.l2_deleted > 0);
                }
                Err(e) => {
                    let error = shared::service::ApiError::from(e);
                    self.trail.record(entry.answered(error.status.as_u16(), None, Some(&error)));
                    return Reply::Error(format!("ERR {}: {}", error.code, error.message));
                }
            }
        }
        Reply::Int(deleted)
    }
}

/// One connection's state.
struct Session {
    /// For `CLIENT ID` and `HELLO`.
    id: u64,
    /// 2 or 3 (`HELLO 3`): how replies are encoded.
    protocol: u8,
    /// The tenant its commands address.
    tenant: Option<Arc<str>>,
    /// Who it authenticated as; `None` before `AUTH` while tokens are on.
    caller: Option<Caller>,
    /// The agent's tokens.
    tokens: Tokens,
    /// `CLIENT SETNAME`.
    name: Option<Bytes>,
    /// Fill tokens of recent misses, by key, oldest first in `order`.
    fills: HashMap<String, String>,
    /// The keys of `fills` in the order they were remembered.
    order: VecDeque<String>,
}

impl Session {
    fn new(id: u64, port: &Port) -> Session {
        Session {
            id,
            protocol: 2,
            tenant: port.default_tenant.clone(),
            caller: if port.tokens.enabled() { None } else { Some(Caller::Anonymous) },
            tokens: port.tokens.clone(),
            name: None,
            fills: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// `AUTH [user] password`: the user names the tenant; the password is a
    /// token's secret when tokens are on (ignored when they are off).
    fn authenticate(&mut self, user: Option<&Bytes>, password: &Bytes) -> Reply {
        let tenant = match user {
            None => None,
            Some(user) => match std::str::from_utf8(user)
                .map_err(|_| ())
                .and_then(|u| shared::names::validate_tenant(u).map(|()| u).map_err(|_| ()))
            {
                Ok(user) => Some(Arc::from(user)),
                Err(()) => {
                    return Reply::Error(
                        "ERR invalid_tenant: the user name is the tenant: 1 to 64 letters, digits, '_' or '-'".into(),
                    )
                }
            },
        };
        if self.tokens.enabled() {
            let token = std::str::from_utf8(password).ok().and_then(|secret| self.tokens.identify(secret));
            match token {
                Some(token) => self.caller = Some(Caller::Token(token)),
                None => return Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into()),
            }
        }
        if tenant.is_some() {
            self.tenant = tenant;
        }
        Reply::Ok
    }

    /// `HELLO [protover [AUTH user password] [SETNAME name]]`.
    fn hello(&mut self, args: &[Bytes]) -> Reply {
        let mut protocol = self.protocol;
        let mut rest = args;
        if let Some((version, tail)) = rest.split_first() {
            protocol = match version.as_ref() {
                b"2" => 2,
                b"3" => 3,
                _ => return Reply::Error("NOPROTO unsupported protocol version".into()),
            };
            rest = tail;
        }
        let mut name = None;
        while let Some((option, tail)) = rest.split_first() {
            match (option.to_ascii_uppercase().as_slice(), tail) {
                (b"AUTH", [user, password, more @ ..]) => {
                    if let Reply::Error(e) = self.authenticate(Some(user), password) {
                        return Reply::Error(e);
                    }
                    rest = more;
                }
                (b"SETNAME", [client, more @ ..]) => {
                    name = Some(client.clone());
                    rest = more;
                }
                _ => return Reply::Error("ERR syntax error in HELLO option".into()),
            }
        }
        if self.caller.is_none() {
            return Reply::Error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH \
                 <user> <pass> option can be used to authenticate the client and select the RESP protocol version at \
                 the same time"
                    .into(),
            );
        }
        self.protocol = protocol;
        if name.is_some() {
            self.name = name;
        }
        Reply::Map(vec![
            ("server", Reply::Bulk(Bytes::from_static(b"dcc-node-agent"))),
            ("version", Reply::Bulk(Bytes::from_static(env!("CARGO_PKG_VERSION").as_bytes()))),
            ("proto", Reply::Int(i64::from(protocol))),
            ("id", Reply::Int(self.id as i64)),
            ("mode", Reply::Bulk(Bytes::from_static(b"standalone"))),
            ("role", Reply::Bulk(Bytes::from_static(b"master"))),
            ("modules", Reply::Array(Vec::new())),
        ])
    }

    /// The tenant and key a command addresses, if the caller may use `scope` on them.
    fn target<'k>(&self, scope: Scope, key: &'k Bytes) -> Result<(Arc<str>, &'k str), Reply> {
        let Some(tenant) = self.tenant.clone() else {
            return Err(Reply::Error(
                "ERR no_tenant: AUTH with the tenant as user name (AUTH <tenant> <token>), or set resp_default_tenant"
                    .into(),
            ));
        };
        let key = std::str::from_utf8(key).map_err(|_| Reply::Error("ERR invalid_key: a key is UTF-8 text".into()))?;
        if let Some(caller) = &self.caller {
            caller.allow(scope, [tenant.as_ref()]).map_err(|e| Reply::Error(format!("NOPERM {}", e.message)))?;
        }
        Ok((tenant, key))
    }

    fn remember_fill(&mut self, key: String, token: String) {
        if self.fills.insert(key.clone(), token).is_none() {
            self.order.push_back(key);
            if self.order.len() > REMEMBERED_FILLS {
                if let Some(oldest) = self.order.pop_front() {
                    self.fills.remove(&oldest);
                }
            }
        }
    }

    fn take_fill(&mut self, key: &str) -> Option<String> {
        let token = self.fills.remove(key)?;
        self.order.retain(|k| k != key);
        Some(token)
    }

    /// Appends a reply, in the connection's protocol.
    fn reply(&self, output: &mut BytesMut, reply: Reply) {
        let encoded = if self.protocol == 3 {
            redis_protocol::resp3::encode::complete::extend_encode(output, &reply.into_resp3(), false).map(drop)
        } else {
            redis_protocol::resp2::encode::extend_encode(output, &reply.into_resp2(), false).map(drop)
        };
        if let Err(e) = encoded {
            // Not expected: every reply is a well-formed frame.
            tracing::error!(error = %e, "a Redis protocol reply could not be encoded");
        }
    }
}

/// `CLIENT SETNAME | SETINFO | GETNAME | ID`.
fn client(session: &mut Session, args: &[Bytes]) -> Reply {
    let Some((sub, rest)) = args.split_first() else {
        return wrong_arity("client");
    };
    match (sub.to_ascii_uppercase().as_slice(), rest) {
        (b"SETNAME", [name]) => {
            session.name = Some(name.clone());
            Reply::Ok
        }
        (b"SETINFO", [_, _]) => Reply::Ok,
        (b"GETNAME", []) => session.name.clone().map_or(Reply::Nil, Reply::Bulk),
        (b"ID", []) => Reply::Int(session.id as i64),
        _ => Reply::Error(format!(
            "ERR unknown subcommand or wrong number of arguments for 'CLIENT|{}'",
            String::from_utf8_lossy(sub).chars().take(32).collect::<String>()
        )),
    }
}

/// `INFO`: what clients that check the server before using it look for.
fn info() -> String {
    format!(
        "# Server\r\nredis_version:7.0.0\r\ndcc_node_agent_version:{}\r\nredis_mode:standalone\r\n\r\n\
         # Persistence\r\nloading:0\r\n\r\n# Replication\r\nrole:master\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// `SET`'s options.
#[derive(Debug, Default, PartialEq)]
struct SetOptions {
    /// `EX` or `PX` (rounded up to whole seconds, the agent's unit); `None`: `default_ttl_secs`.
    ttl_secs: Option<u64>,
    /// Only if not cached.
    nx: bool,
    /// Only if cached.
    xx: bool,
}

impl SetOptions {
    fn parse(args: &[Bytes]) -> Result<SetOptions, Reply> {
        let mut options = SetOptions::default();
        let mut rest = args;
        let syntax = || Reply::Error("ERR syntax error".into());
        let expire = |value: &Bytes, per_second: u64| -> Result<u64, Reply> {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v > 0)
                .map(|v| v.div_ceil(per_second))
                .ok_or_else(|| Reply::Error("ERR invalid expire time in 'set' command".into()))
        };
        while let Some((option, tail)) = rest.split_first() {
            match (option.to_ascii_uppercase().as_slice(), tail) {
                (b"EX", [value, more @ ..]) if options.ttl_secs.is_none() => {
                    options.ttl_secs = Some(expire(value, 1)?);
                    rest = more;
                }
                (b"PX", [value, more @ ..]) if options.ttl_secs.is_none() => {
                    options.ttl_secs = Some(expire(value, 1000)?);
                    rest = more;
                }
                (b"NX", more) if !options.xx => {
                    options.nx = true;
                    rest = more;
                }
                (b"XX", more) if !options.nx => {
                    options.xx = true;
                    rest = more;
                }
                _ => return Err(syntax()),
            }
        }
        Ok(options)
    }
}

/// A reply, before it is encoded in the connection's protocol.
#[derive(Debug, PartialEq)]
enum Reply {
    /// `+OK`.
    Ok,
    /// A simple string.
    Status(&'static str),
    /// A bulk string.
    Bulk(Bytes),
    /// Nil (`$-1` in RESP2, `_` in RESP3).
    Nil,
    /// An integer.
    Int(i64),
    /// An error: its first word is the code (`ERR`, `NOAUTH`, ...).
    Error(String),
    /// An array.
    Array(Vec<Reply>),
    /// A map (a flat array in RESP2).
    Map(Vec<(&'static str, Reply)>),
}

impl Reply {
    fn into_resp2(self) -> Frame2 {
        match self {
            Reply::Ok => Frame2::SimpleString(Bytes::from_static(b"OK")),
            Reply::Status(s) => Frame2::SimpleString(Bytes::from_static(s.as_bytes())),
            Reply::Bulk(b) => Frame2::BulkString(b),
            Reply::Nil => Frame2::Null,
            Reply::Int(i) => Frame2::Integer(i),
            Reply::Error(e) => Frame2::Error(one_line(e).into()),
            Reply::Array(items) => Frame2::Array(items.into_iter().map(Reply::into_resp2).collect()),
            Reply::Map(pairs) => Frame2::Array(
                pairs
                    .into_iter()
                    .flat_map(|(k, v)| [Frame2::BulkString(Bytes::from_static(k.as_bytes())), v.into_resp2()])
                    .collect(),
            ),
        }
    }

    fn into_resp3(self) -> Frame3 {
        match self {
            Reply::Ok => Frame3::SimpleString { data: Bytes::from_static(b"OK"), attributes: None },
            Reply::Status(s) => Frame3::SimpleString { data: Bytes::from_static(s.as_bytes()), attributes: None },
            Reply::Bulk(b) => Frame3::BlobString { data: b, attributes: None },
            Reply::Nil => Frame3::Null,
            Reply::Int(i) => Frame3::Number { data: i, attributes: None },
            Reply::Error(e) => Frame3::SimpleError { data: one_line(e).into(), attributes: None },
            Reply::Array(items) => {
                Frame3::Array { data: items.into_iter().map(Reply::into_resp3).collect(), attributes: None }
            }
            Reply::Map(pairs) => Frame3::Map {
                data: pairs
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            Frame3::BlobString { data: Bytes::from_static(k.as_bytes()), attributes: None },
                            v.into_resp3(),
                        )
                    })
                    .collect(),
                attributes: None,
            },
        }
    }
}

/// An error line may not hold a line break.
fn one_line(error: String) -> String {
    if error.contains(['\r', '\n']) {
        error.replace(['\r', '\n'], " ")
    } else {
        error
    }
}

fn wrong_arity(command: &str) -> Reply {
    Reply::Error(format!("ERR wrong number of arguments for '{command}' command"))
}

/// An agent error as a Redis error: `ERR <code>: <message>`, the code the
/// HTTP API would answer.
fn agent_error(e: AgentError) -> Reply {
    let error = shared::service::ApiError::from(e);
    Reply::Error(format!("ERR {}: {}", error.code, error.message))
}

/// A command's words, if the frame is an array of strings.
fn command_args(frame: Frame2) -> Option<Vec<Bytes>> {
    match frame {
        Frame2::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Frame2::BulkString(b) | Frame2::SimpleString(b) => Some(b),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<Bytes> {
        text.split(' ').map(|w| Bytes::from(w.to_string())).collect()
    }

    #[test]
    fn set_options_are_parsed_as_redis_parses_them() {
        let parse = |text: &str| SetOptions::parse(&words(text));
        assert_eq!(parse("EX 10"), Ok(SetOptions { ttl_secs: Some(10), ..SetOptions::default() }));
        assert_eq!(parse("px 1500 nx"), Ok(SetOptions { ttl_secs: Some(2), nx: true, xx: false }));
        assert_eq!(parse("XX"), Ok(SetOptions { xx: true, ..SetOptions::default() }));
        for bad in ["NX XX", "EX", "EX 0", "EX -1", "EX ten", "EX 1 PX 1000", "KEEPTTL", "GET"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    /// A connection's state with nothing authenticated or remembered yet.
    fn session(protocol: u8) -> Session {
        Session {
            id: 1,
            protocol,
            tenant: None,
            caller: None,
            tokens: Tokens::default(),
            name: None,
            fills: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    #[test]
    fn replies_encode_in_both_protocols() {
        let encode = |protocol: u8, reply: Reply| {
            let mut out = BytesMut::new();
            let session = session(protocol);
            session.reply(&mut out, reply);
            String::from_utf8(out.to_vec()).unwrap_or_default()
        };
        assert_eq!(encode(2, Reply::Nil), "$-1\r\n");
        assert_eq!(encode(3, Reply::Nil), "_\r\n");
        assert_eq!(encode(2, Reply::Ok), "+OK\r\n");
        assert_eq!(encode(2, Reply::Int(-2)), ":-2\r\n");
        assert_eq!(encode(2, Reply::Error("ERR two\r\nlines".into())), "-ERR two  lines\r\n");
        assert_eq!(encode(2, Reply::Map(vec![("proto", Reply::Int(2))])), "*2\r\n$5\r\nproto\r\n:2\r\n");
        assert_eq!(encode(3, Reply::Map(vec![("proto", Reply::Int(3))])), "%1\r\n$5\r\nproto\r\n:3\r\n");
    }

    #[test]
    fn a_connection_remembers_a_bounded_number_of_fill_tokens() {
        let mut session = session(2);
        for i in 0..REMEMBERED_FILLS + 10 {
            session.remember_fill(format!("k{i}"), format!("t{i}"));
        }
        assert_eq!(session.fills.len(), REMEMBERED_FILLS);
        assert_eq!(session.take_fill("k0"), None, "the oldest was forgotten");
        assert_eq!(
            session.take_fill(&format!("k{}", REMEMBERED_FILLS + 9)).as_deref(),
            Some(&*format!("t{}", REMEMBERED_FILLS + 9))
        );
        assert_eq!(session.order.len(), REMEMBERED_FILLS - 1);
    }
}
