//! `libraftis.so`: the Redis module. `RedisModule_OnLoad` parses the arguments, checks that Redis'
//! own persistence will not fight the Raft log, opens the log, registers the `RAFT.*` commands and
//! the command filter, and restarts the Raft node if this server already belongs to a cluster.
//!
//! Every entry point from Redis goes through [`guard`]: a panic becomes an `-ERR` reply and a log
//! line instead of aborting redis-server.

mod acl;
mod apply;
mod blocked;
mod blocking;
mod clock;
mod cluster_ops;
mod cluster_view;
mod collation;
mod command_table;
mod commands;
mod config_cmd;
mod digest;
mod expiry;
mod ffi;
mod filter;
mod forward;
mod forward_blocking;
mod gate;
mod glob;
mod held;
mod help;
mod logger;
mod memory;
mod peer_user;
mod read;
mod redis_settings;
mod replica_reads;
mod reply;
mod reply_arranged;
mod restore_trial;
mod runaway;
mod scripts;
mod set_pop;
mod snapshot;
mod stale_timers;
mod state;
mod stream_probe;
mod tracking;
mod transaction;
mod wait;
mod watch;
mod write;

use ffi::{api, RedisModuleCtx, RedisModuleString};
use raftis_core::settings::Settings;
use raftis_core::storage::LogStore;
use redis_module::raw;
use reply::Reply;
use std::net::{IpAddr, SocketAddr};
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};

const MODULE_NAME: &str = "raft";

/// Runs a command handler, turning errors and panics into error replies. A lone write of the
/// client gets its place in the output first (see `held`): the command may answer at once.
fn guard(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
    handler: fn(*mut RedisModuleCtx, Vec<Vec<u8>>) -> Result<Reply, String>,
) -> c_int {
    let args = ffi::args_of(argv, argc);
    let (outcome, arranged) = reply_arranged::during(|| {
        std::panic::catch_unwind(|| {
            refuse_if_caller_cannot_wait(ctx, args.first().map(Vec::as_slice))?;
            held::before_command(ctx);
            handler(ctx, args)
        })
    });
    answer(ctx, outcome, arranged)
}

/// The commands whose answer may wait for the cluster: they block their client. (`RAFT._READ`
/// runs a read at once when it can, so it checks where it would wait: `read`, `forward`.)
const MAY_BLOCK: &[&str] = &[
    filter::WRITE_COMMAND,
    blocking::BLOCK_COMMAND,
    filter::WATCH_COMMAND,
    wait::WAIT_COMMAND,
    "raft.cluster",
    "raft._join",
    "raft.addpeer",
    "raft.removepeer",
    "raft.transferleader",
    "raft.snapshot",
];

/// See [`blocked::refuse_if_caller_cannot_wait`], for the commands that may wait.
fn refuse_if_caller_cannot_wait(ctx: *mut RedisModuleCtx, name: Option<&[u8]>) -> Result<(), String> {
    match name.is_some_and(|n| MAY_BLOCK.iter().any(|m| n.eq_ignore_ascii_case(m.as_bytes()))) {
        true => blocked::refuse_if_caller_cannot_wait(ctx),
        false => Ok(()),
    }
}

/// [`guard`] for the handlers every client command goes through: they borrow the arguments
/// (alive until the command returns) instead of copying each one.
fn guard_borrowed(
    ctx: *mut RedisModuleCtx,
    argv: *mut *mut RedisModuleString,
    argc: c_int,
    handler: fn(*mut RedisModuleCtx, &[&[u8]]) -> Result<Reply, String>,
) -> c_int {
    let args = ffi::borrowed_args(argv, argc);
    let (outcome, arranged) = reply_arranged::during(|| {
        std::panic::catch_unwind(|| {
            refuse_if_caller_cannot_wait(ctx, args.first().copied())?;
            held::before_command(ctx);
            handler(ctx, &args)
        })
    });
    answer(ctx, outcome, arranged)
}

/// Sends a handler's reply. One that `arranged` its client's reply already (see
/// `reply_arranged`) sends no error on top of it: the client gets the reply arranged, or, if the
/// panic dropped what held it, the error that gives.
fn answer(ctx: *mut RedisModuleCtx, outcome: std::thread::Result<Result<Reply, String>>, arranged: bool) -> c_int {
    match outcome {
        Ok(Ok(reply)) => reply.send(ctx),
        Ok(Err(e)) if arranged => log::error!("a command handler failed after arranging its client's reply: {e}"),
        Ok(Err(e)) => {
            ffi::reply_error(ctx, &e);
        }
        Err(panic) => {
            let what =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            log::error!("panic in a command handler: {what}");
            if !arranged {
                ffi::reply_error(ctx, "ERR internal error (panic); see the Redis log");
            }
        }
    }
    ffi::OK
}

macro_rules! command {
    ($fn_name:ident, $handler:expr) => {
        extern "C" fn $fn_name(ctx: *mut RedisModuleCtx, argv: *mut *mut RedisModuleString, argc: c_int) -> c_int {
            guard(ctx, argv, argc, $handler)
        }
    };
    (borrowed $fn_name:ident, $handler:expr) => {
        extern "C" fn $fn_name(ctx: *mut RedisModuleCtx, argv: *mut *mut RedisModuleString, argc: c_int) -> c_int {
            guard_borrowed(ctx, argv, argc, $handler)
        }
    };
}

// The client's command behind each internal one is checked against its user's ACL rules first
// (see `acl`).
command!(borrowed cmd_write, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    write::write(ctx, args).map(|_| Reply::Blocked)
});
command!(borrowed run_read, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    read::read(ctx, args).map(|_| Reply::Blocked)
});
/// RAFT._READ, or Redis asking which keys it reads (`getkeys-api`): its command's, one further on.
/// Redis remembers them for the client's `CLIENT TRACKING`, which then gets invalidations as
/// for a plain read, and checks them against the client's ACL key patterns.
extern "C" fn cmd_read(ctx: *mut RedisModuleCtx, argv: *mut *mut RedisModuleString, argc: c_int) -> c_int {
    if unsafe { api!(RedisModule_IsKeysPositionRequest)(ctx) } == 0 {
        return run_read(ctx, argv, argc);
    }
    let args = ffi::borrowed_args(argv, argc);
    let reported = std::panic::catch_unwind(|| {
        // Only what RAFT._READ runs: a read, never itself again (`RAFT._READ RAFT._READ ...`
        // would ask Redis for keys level after level, until the stack overflows).
        let command = args.get(1..).unwrap_or_default();
        if !matches!(state::get().route(command), raftis_core::routing::Route::Read) {
            return;
        }
        let keys = ffi::CommandKeys::of(ctx, command);
        // Read access: a user whose key patterns allow only reads (`%R~app:*`) may run it.
        let read = (raw::REDISMODULE_CMD_KEY_RO | raw::REDISMODULE_CMD_KEY_ACCESS) as c_int;
        for &at in keys.positions() {
            unsafe { api!(RedisModule_KeyAtPosWithFlags)(ctx, (at + 1) as c_int, read) };
        }
    });
    if reported.is_err() {
        log::error!("panic while naming the keys of a read");
    }
    ffi::OK
}
command!(borrowed cmd_block, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    blocking::block(ctx, args).map(|_| Reply::Blocked)
});
command!(cmd_config, |_, args| config_cmd::config(&args));
command!(cmd_refuse, |_, args| Err(write::refuse(args)));
command!(borrowed cmd_script_kill, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    scripts::kill(ctx, args).map(|_| Reply::Blocked)
});
command!(borrowed cmd_function_stats, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    scripts::stats(ctx, args).map(|_| Reply::Blocked)
});
command!(cmd_error, |_, args| Err(args.get(1).map_or_else(|| "ERR refused".into(), |e| String::from_utf8_lossy(e).into_owned())));
command!(borrowed cmd_multi, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    transaction::begin(ctx).map(|_| Reply::Blocked)
});
command!(borrowed cmd_watch, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    watch::watch(ctx, args).map(|_| Reply::Blocked)
});
command!(borrowed cmd_unwatch, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    watch::unwatch(ctx, args).map(|_| Reply::Blocked)
});
command!(borrowed cmd_wait, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    wait::wait(ctx, args)
});
command!(borrowed cmd_cluster_view, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    cluster_view::cluster(ctx, args)
});
command!(borrowed cmd_cluster_info, |ctx, args| {
    acl::check(ctx, &args[1..])?;
    cluster_view::info(ctx, args)
});
command!(cmd_cluster, |ctx, args| commands::cluster(ctx, &args));
command!(cmd_auth, |ctx, args| peer_user::auth(ctx, &args));
command!(cmd_join, |ctx, args| commands::internal_join(ctx, &args));
command!(cmd_identify, |ctx, args| commands::identify(ctx, &args));
command!(cmd_addpeer, |ctx, args| commands::add_peer(ctx, &args));
command!(cmd_removepeer, |ctx, args| commands::remove_peer(ctx, &args));
command!(cmd_transferleader, |ctx, args| commands::transfer_leader(ctx, &args));
command!(cmd_peers, |_, args| commands::peers(&args));
command!(cmd_leader, |_, args| commands::leader(&args));
command!(cmd_state, |_, args| commands::role(&args));
command!(cmd_info, |_, args| commands::info(&args));
command!(cmd_stats, |_, args| commands::stats(&args));
command!(cmd_snapshot, |ctx, args| commands::snapshot(ctx, &args));
command!(cmd_digest, |ctx, args| digest::digest(ctx, &args));
command!(cmd_help, |_, args| commands::help(&args));

type CommandFn = extern "C" fn(*mut RedisModuleCtx, *mut *mut RedisModuleString, c_int) -> c_int;

const COMMANDS: &[(&str, CommandFn, &str)] = &[
    (filter::WRITE_COMMAND, cmd_write, "write"),
    (filter::REFUSE_COMMAND, cmd_refuse, "fast"),
    (filter::ERROR_COMMAND, cmd_error, "fast"),
    (scripts::KILL_COMMAND, cmd_script_kill, "allow-loading allow-busy fast"),
    (scripts::STATS_COMMAND, cmd_function_stats, "allow-loading allow-busy"),
    (read::READ_COMMAND, cmd_read, "readonly getkeys-api"),
    (blocking::BLOCK_COMMAND, cmd_block, "write"),
    (filter::MULTI_COMMAND, cmd_multi, "fast"),
    (filter::WATCH_COMMAND, cmd_watch, "fast"),
    // As UNWATCH itself.
    (filter::UNWATCH_COMMAND, cmd_unwatch, "deny-script allow-loading allow-stale allow-busy fast"),
    (wait::WAIT_COMMAND, cmd_wait, "fast"),
    (cluster_view::CLUSTER_COMMAND, cmd_cluster_view, "readonly fast"),
    // Like INFO itself: it answers while Redis loads its data, and on a replica that is stale.
    (cluster_view::INFO_COMMAND, cmd_cluster_info, "allow-loading allow-stale"),
    ("raft.config", cmd_config, "admin"),
    ("raft.cluster", cmd_cluster, "admin"),
    // Needs no login: it is how other nodes log in (see `peer_user`).
    (peer_user::AUTH_COMMAND, cmd_auth, "no-auth fast"),
    ("raft._join", cmd_join, "admin"),
    ("raft._identify", cmd_identify, "admin"),
    ("raft.addpeer", cmd_addpeer, "admin"),
    ("raft.removepeer", cmd_removepeer, "admin"),
    ("raft.transferleader", cmd_transferleader, "admin"),
    ("raft.peers", cmd_peers, "readonly fast"),
    ("raft.leader", cmd_leader, "readonly fast"),
    ("raft.state", cmd_state, "readonly fast"),
    // Answers while a script the log applies holds the main thread (see `runaway`).
    ("raft.info", cmd_info, "readonly fast allow-loading allow-busy"),
    ("raft.stats", cmd_stats, "readonly fast"),
    ("raft.snapshot", cmd_snapshot, "admin"),
    // Like DEBUG DIGEST: it reads the whole dataset, and says nothing of what a client may read.
    ("raft.digest", cmd_digest, "admin"),
    ("raft.help", cmd_help, "readonly fast allow-loading allow-busy"),
];

/// Redis' entry point when it loads the module.
///
/// # Safety
/// Called by Redis only, on its main thread, with `MODULE LOAD`'s arguments.
#[no_mangle]
#[allow(non_snake_case)]
pub unsafe extern "C" fn RedisModule_OnLoad(ctx: *mut RedisModuleCtx, argv: *mut *mut RedisModuleString, argc: c_int) -> c_int {
    let name = ffi::cstr(MODULE_NAME);
    if raw::Export_RedisModule_Init(ctx, name.as_ptr(), 1, raw::REDISMODULE_APIVER_1 as c_int) == ffi::ERR {
        return ffi::ERR;
    }
    logger::install();
    if PAST_NO_RETURN.load(Ordering::Relaxed) {
        ffi::log_line(
            "warning",
            "<raft> cannot load the Raftis module: an earlier load in this process failed; restart redis-server to load it",
        );
        return ffi::ERR;
    }
    // Not read lossily: two raft-passwords (or dirs) that differ only in invalid bytes would
    // become the same one.
    let args: Result<Vec<String>, usize> =
        ffi::args_of(argv, argc).into_iter().enumerate().map(|(i, a)| String::from_utf8(a).map_err(|_| i + 1)).collect();
    let args = match args {
        Ok(args) => args,
        Err(n) => {
            ffi::log_line("warning", &format!("<raft> cannot load the Raftis module: argument {n} is not valid UTF-8"));
            return ffi::ERR;
        }
    };
    match std::panic::catch_unwind(|| load(ctx, &args)) {
        Ok(Ok(())) => ffi::OK,
        Ok(Err(e)) => {
            ffi::log_line("warning", &format!("<raft> cannot load the Raftis module: {e:#}"));
            ffi::ERR
        }
        Err(_) => {
            ffi::log_line("warning", "<raft> cannot load the Raftis module: internal error (panic)");
            ffi::ERR
        }
    }
}

/// Rust statics cannot be re-initialised and background threads cannot be torn down safely.
#[no_mangle]
#[allow(non_snake_case)]
pub extern "C" fn RedisModule_OnUnload(_ctx: *mut RedisModuleCtx) -> c_int {
    ffi::log_line("warning", "<raft> MODULE UNLOAD refused: Raftis cannot be unloaded; restart redis-server instead");
    ffi::ERR
}

/// Set once a load has gone past the steps that can be tried again (see [`load`]).
static PAST_NO_RETURN: AtomicBool = AtomicBool::new(false);

fn load(ctx: *mut RedisModuleCtx, args: &[String]) -> anyhow::Result<()> {
    let mut settings = Settings::parse(args)?;
    redis_settings::check_commands_at_load(ctx)?;
    redis_settings::check_at_load(ctx)?;
    // Without Redis' allocation counter no limit can be held; the node still runs without one.
    if let Err(why) = memory::init() {
        log::warn!("{why}: no memory limit can be set");
    }
    memory::check_limit(settings.maxmemory).map_err(|e| anyhow::anyhow!("maxmemory={}: {e}", settings.maxmemory))?;

    let port: u16 = ffi::config_get(ctx, "port")
        .and_then(|p| p.parse().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| anyhow::anyhow!("Raftis needs Redis to listen on a TCP port"))?;
    redis_settings::remember_port(port);
    let raft_port = match settings.raft_port {
        Some(p) => p,
        None => port.checked_add(10000).ok_or_else(|| anyhow::anyhow!("port {port} + 10000 is not a port; set raft-port"))?,
    };
    // The side port listens where Redis does (its first bind address); wildcard binds listen
    // everywhere and advertise loopback unless advertise-addr says otherwise.
    let bind = ffi::config_get(ctx, "bind").unwrap_or_default();
    redis_settings::remember_bind(&bind);
    let bind_ip: IpAddr = redis_settings::side_port_address(&bind).and_then(|b| b.parse().ok()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let (client_addr, host) = match &settings.advertise_addr {
        Some(addr) => (addr.clone(), addr.rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or_default()),
        None => {
            let host = if bind_ip.is_unspecified() {
                // Nodes on other hosts would dial their own loopback: only a one-host cluster works.
                log::warn!(
                    "Redis binds every address, so this node tells the others it is at 127.0.0.1:{port}; \
                     for nodes on several hosts, give advertise-addr=HOST:PORT or a --bind address"
                );
                "127.0.0.1".to_string()
            } else if bind_ip.is_ipv6() {
                format!("[{bind_ip}]")
            } else {
                bind_ip.to_string()
            };
            (format!("{host}:{port}"), host)
        }
    };
    let raft_addr = format!("{host}:{raft_port}");
    let listen = SocketAddr::new(bind_ip, raft_port);

    std::fs::create_dir_all(&settings.dir).map_err(|e| anyhow::anyhow!("cannot create dir={}: {e}", settings.dir.display()))?;
    // A relative dir is Redis' working directory's, which `CONFIG SET dir` moves: snapshots
    // written and read later would be looked for elsewhere.
    settings.dir = settings.dir.canonicalize().map_err(|e| anyhow::anyhow!("cannot resolve dir={}: {e}", settings.dir.display()))?;
    // From here on, what is set up cannot be set up again in this process: the library stays
    // mapped after a load that failed, and its statics (the open log, the state) with it.
    PAST_NO_RETURN.store(true, Ordering::Relaxed);
    // Held until the process exits (the module cannot be unloaded).
    static DIR_LOCK: std::sync::OnceLock<raftis_core::dir_lock::DirLock> = std::sync::OnceLock::new();
    let _ = DIR_LOCK.set(raftis_core::dir_lock::lock(&settings.dir)?);
    let store =
        LogStore::open(&settings.dir).map_err(|e| anyhow::anyhow!("cannot open the raft log in {}: {e}", settings.dir.display()))?;
    let table = command_table::load(ctx)?;
    let shared = raftis_core::shared_settings::SharedSettings::read(|name| ffi::config_get(ctx, name).unwrap_or_default());
    let databases: u32 = shared.get("databases").and_then(|d| d.parse().ok()).unwrap_or(16);
    check_snapshot(&store, &settings.dir)?;
    let _ = raftis_core::snapshot_file::remove_leftovers(&settings.dir);
    let apply_ctx = ffi::DetachedContext::new(ctx);
    runaway::init(settings.skip_entry);
    let s = state::init(state::Raftis::new(settings, store, listen, client_addr, raft_addr, table, apply_ctx, databases, shared));
    // Redis drops a module's commands when its OnLoad fails, but keeps its filters and event
    // subscriptions, which would go on rewriting every client command into a `RAFT._*` command
    // that no longer exists: whatever is hooked into Redis from here on is unhooked again if a
    // later step fails (a side port taken, say, at a `MODULE LOAD` after a restart).
    let mut hooks = Hooks::new(ctx);
    // A panic is a failure too, and must not skip the undoing.
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook_in_and_start(ctx, s, &mut hooks)))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error (panic)")));
    if started.is_err() {
        hooks.undo();
    }
    started
}

/// What the module hooked into Redis at load (see [`load`]).
struct Hooks {
    ctx: *mut RedisModuleCtx,
    events: Vec<raw::RedisModuleEvent>,
    filters: Vec<*mut raw::RedisModuleCommandFilter>,
    /// Redis' background expiry was switched off (see `expiry`).
    expiry_paused: bool,
    clock_hooked: bool,
    /// The collation the process had (see `collation`).
    collation: Option<std::ffi::CString>,
}

impl Hooks {
    fn new(ctx: *mut RedisModuleCtx) -> Hooks {
        Hooks { ctx, events: Vec::new(), filters: Vec::new(), expiry_paused: false, clock_hooked: false, collation: None }
    }

    fn subscribe(&mut self, id: u64, callback: raw::RedisModuleEventCallback, what: &str) -> anyhow::Result<()> {
        let event = raw::RedisModuleEvent { id, dataver: 1 };
        let rc = unsafe { api!(RedisModule_SubscribeToServerEvent)(self.ctx, event, callback) };
        anyhow::ensure!(rc == ffi::OK, "cannot subscribe to {what}");
        self.events.push(event);
        Ok(())
    }

    fn filter(&mut self, filter: raw::RedisModuleCommandFilterFunc, flags: u32, what: &str) -> anyhow::Result<()> {
        let registered = unsafe { api!(RedisModule_RegisterCommandFilter)(self.ctx, filter, flags as c_int) };
        anyhow::ensure!(!registered.is_null(), "cannot register {what}");
        self.filters.push(registered);
        Ok(())
    }

    fn undo(self) {
        apply::abandon();
        for filter in self.filters {
            unsafe { api!(RedisModule_UnregisterCommandFilter)(self.ctx, filter) };
        }
        for event in self.events {
            unsafe { api!(RedisModule_SubscribeToServerEvent)(self.ctx, event, None) };
        }
        if self.expiry_paused {
            expiry::resume(self.ctx);
        }
        if self.clock_hooked {
            clock::unhook();
        }
        if let Some(previous) = &self.collation {
            collation::restore(previous);
        }
    }
}

/// The part of [`load`] that hooks the module into Redis, recording each hook in `hooks`, and
/// then starts the node if it is in a cluster.
fn hook_in_and_start(ctx: *mut RedisModuleCtx, s: &'static state::Raftis, hooks: &mut Hooks) -> anyhow::Result<()> {
    // The module opens keys for writing only to expire them (see `expiry`): closing such a key
    // must not tell WATCH and client tracking it was modified. A deletion says so itself.
    unsafe { api!(RedisModule_SetModuleOptions)(ctx, raw::REDISMODULE_OPTION_NO_IMPLICIT_SIGNAL_MODIFIED as c_int) };
    held::init(ctx);
    log::info!("{}", held::describe());
    hooks.clock_hooked = true;
    log::info!("{}", clock::init());
    // After the clock: the module runs Redis' background expiry by it.
    hooks.expiry_paused = true;
    log::info!("{}", expiry::init(ctx));
    log::info!("{}", scripts::init());
    hooks.collation = collation::bytewise();
    hooks.subscribe(raw::REDISMODULE_EVENT_EVENTLOOP, Some(on_event_loop), "the event loop")?;
    hooks.subscribe(raw::REDISMODULE_EVENT_CLIENT_CHANGE, Some(replica_reads::on_client_change), "client changes")?;
    hooks.subscribe(raw::REDISMODULE_EVENT_SHUTDOWN, Some(on_shutdown), "the shutdown event")?;
    hooks.subscribe(raw::REDISMODULE_EVENT_PERSISTENCE, Some(on_persistence), "the persistence event")?;

    for (name, handler, flags) in COMMANDS {
        let (n, f) = (ffi::cstr(name), ffi::cstr(flags));
        let rc = unsafe { api!(RedisModule_CreateCommand)(ctx, n.as_ptr(), Some(*handler), f.as_ptr(), 0, 0, 0) };
        anyhow::ensure!(rc == ffi::OK, "cannot register command {name}");
    }
    hooks.filter(Some(filter::filter), raw::REDISMODULE_CMDFILTER_NOSELF, "the command filter")?;
    peer_user::init()?;
    // Not NOSELF: it must see what a script the module applies calls (see `scripts`).
    hooks.filter(Some(scripts::filter), 0, "the script command filter")?;
    unsafe { api!(RedisModule_RegisterInfoFunc)(ctx, Some(info_section)) };

    if s.store.is_initialized() {
        let id = s.stored_node_id()?.ok_or_else(|| anyhow::anyhow!("the raft log in {} has no node id", s.settings().dir.display()))?;
        // Most likely two nodes' dirs mixed up: this one would run as the node its log belongs
        // to, under the other's address.
        if let Some(given) = s.settings().node_id.filter(|given| *given != id) {
            anyhow::bail!(
                "node-id={given} but the raft log in {} belongs to node {id}: is dir= the right one? (node-id= only names a node that \
                 has not joined a cluster yet; drop it or make it {id})",
                s.settings().dir.display()
            );
        }
        s.start_node(id, state::Start::AsIs)?;
        log::info!("node {id} restarted from {}; replaying the log", s.settings().dir.display());
    } else {
        log::info!("Raftis loaded; this node is not in a cluster yet (RAFT.CLUSTER INIT or RAFT.CLUSTER JOIN)");
    }
    Ok(())
}

/// A node whose snapshot file is missing or corrupt refuses to start rather than serve a wrong
/// dataset: the operator restores the file, or wipes `dir` and lets the node re-join.
fn check_snapshot(store: &LogStore, dir: &std::path::Path) -> anyhow::Result<()> {
    let snapshot = match raft::Storage::snapshot(store, 0, 0) {
        Ok(snapshot) => snapshot,
        // A log that starts after index 1 continues a snapshot: without it, the node would
        // rebuild its dataset from the log's rest alone.
        Err(e) if store.first_index() > 1 => anyhow::bail!(
            "the raft log starts at index {} but its snapshot record cannot be read ({e}); refusing to start with bad data",
            store.first_index()
        ),
        Err(_) => return Ok(()),
    };
    let Ok((_, app)) = raftis_core::snapshot_data::decode(&snapshot.data) else {
        anyhow::bail!("the raft log's snapshot record is corrupt");
    };
    let Some(descriptor) = raftis_core::snapshot_transfer::SnapshotDescriptor::decode(app) else {
        anyhow::ensure!(app.is_empty(), "the raft log's snapshot record names no readable snapshot file; refusing to start with bad data");
        return Ok(());
    };
    let path = dir.join(&descriptor.file);
    let summary = raftis_core::snapshot_file::verify(&path)
        .map_err(|e| anyhow::anyhow!("snapshot {} is unusable ({e}); refusing to start with bad data", path.display()))?;
    anyhow::ensure!(
        summary.checksum == descriptor.checksum,
        "snapshot {} does not match the log's record of it (checksum); refusing to start with bad data",
        path.display()
    );
    Ok(())
}

/// Redis' event-loop event: before Redis sleeps, held replies ask for their leadership checks,
/// the transaction EXEC built is proposed, WATCH forgets clients that have gone, blocking pops
/// waiting on a node that is no longer the leader are answered, and Redis'
/// background expiry is switched on or off (see `expiry`).
extern "C" fn on_event_loop(ctx: *mut RedisModuleCtx, event: raw::RedisModuleEvent, subevent: u64, data: *mut std::ffi::c_void) {
    held::on_event_loop(ctx, event, subevent, data);
    if subevent != raw::REDISMODULE_SUBEVENT_EVENTLOOP_BEFORE_SLEEP {
        return;
    }
    if std::panic::catch_unwind(transaction::before_sleep).is_err() {
        log::error!("panic in the event-loop hook for transactions");
    }
    if std::panic::catch_unwind(watch::before_sleep).is_err() {
        log::error!("panic in the event-loop hook for WATCH");
    }
    if std::panic::catch_unwind(blocking::before_sleep).is_err() {
        log::error!("panic in the event-loop hook for blocking pops");
    }
    if std::panic::catch_unwind(forward_blocking::before_sleep).is_err() {
        log::error!("panic in the event-loop hook for forwarded blocking commands");
    }
    if std::panic::catch_unwind(|| expiry::before_sleep(ctx)).is_err() {
        log::error!("panic in the event-loop hook for key expiry");
    }
    if std::panic::catch_unwind(|| stale_timers::before_sleep(ctx)).is_err() {
        log::error!("panic in the event-loop hook for stale timers");
    }
}

/// Redis is about to exit (`SHUTDOWN`, or SIGTERM): a leader hands leadership over, then the
/// node stops.
extern "C" fn on_shutdown(_ctx: *mut RedisModuleCtx, _event: raw::RedisModuleEvent, _subevent: u64, _data: *mut std::ffi::c_void) {
    if std::panic::catch_unwind(cluster_ops::before_exit).is_err() {
        log::error!("panic while stopping the raft node at shutdown");
    }
}

/// Redis is about to save its dump file on the main thread (`SAVE`, or `SHUTDOWN SAVE`, which
/// saves before the shutdown event): see `cluster_ops::before_blocking_save`. (The other starts
/// fire in a `BGSAVE` child, or for files Raftis refuses.)
extern "C" fn on_persistence(_ctx: *mut RedisModuleCtx, _event: raw::RedisModuleEvent, subevent: u64, _data: *mut std::ffi::c_void) {
    if subevent == raw::REDISMODULE_SUBEVENT_PERSISTENCE_SYNC_RDB_START
        && std::panic::catch_unwind(cluster_ops::before_blocking_save).is_err()
    {
        log::error!("panic while handing leadership over before a save");
    }
}

extern "C" fn info_section(ctx: *mut raw::RedisModuleInfoCtx, for_crash_report: c_int) {
    // Redis' crash report asks too: the fields take locks that the crashing thread may hold, and
    // waiting for one would hang the server instead of letting it die and be restarted.
    if for_crash_report != 0 {
        return;
    }
    let _ = std::panic::catch_unwind(|| {
        let empty = ffi::cstr("");
        unsafe { api!(RedisModule_InfoAddSection)(ctx, empty.as_ptr()) };
        for (k, v) in commands::info_fields() {
            let (k, v) = (ffi::cstr(&k), ffi::cstr(&v));
            unsafe { api!(RedisModule_InfoAddFieldCString)(ctx, k.as_ptr(), v.as_ptr()) };
        }
    });
}
