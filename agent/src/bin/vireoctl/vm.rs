//! `vireoctl vm ...`: one VM through vireod (or one VMM through `--vm-socket`), and the
//! bulk forms that act on clustered VMs (`bulk.rs`).

use super::*;

#[derive(Subcommand, Debug)]
pub(crate) enum VmCommand {
    /// Define a VM from a JSON file: a VM config (as `vireo --config` takes) or a full
    /// definition ({"config": ..., "priority": ..., "restart": ...}).
    Define {
        name: String,
        /// The JSON file ("-" for standard input).
        #[arg(long, short)]
        file: PathBuf,
        #[arg(long, value_enum)]
        priority: Option<Priority>,
        #[arg(long, value_enum)]
        restart: Option<RestartPolicy>,
        #[arg(long)]
        max_restarts: Option<u32>,
        /// Define it in the cluster (vireod must be a cluster node): it runs on the
        /// node the cluster picks and fails over by --priority (off: No Auto Start).
        #[arg(long)]
        cluster: bool,
        /// With --cluster: a node to prefer (repeatable, best first).
        #[arg(long = "preferred-owner", requires = "cluster")]
        preferred_owners: Vec<String>,
        /// With --cluster: a node allowed to run it (repeatable; none: every node).
        #[arg(long = "possible-owner", requires = "cluster")]
        possible_owners: Vec<String>,
        /// With --cluster: VMs of one class are spread over nodes when possible.
        #[arg(long, requires = "cluster")]
        anti_affinity: Option<String>,
        /// With --cluster: define it without starting it.
        #[arg(long, requires = "cluster")]
        no_start: bool,
        /// With --cluster: processor compatibility mode — its vCPUs get only the CPU
        /// features every node has now, so it can live-migrate between CPU generations.
        #[arg(long, requires = "cluster")]
        cpu_compat: bool,
    },
    /// Define a VM from flags — the same flags as `vireo` (--kernel, --cpus, --memory,
    /// --disk, --net, --console, ...), no JSON file needed — through vireod as `vm
    /// define` does. Relative paths are taken from the current directory.
    Create {
        name: String,
        #[command(flatten)]
        vm: api::config::VmFlags,
        #[command(flatten)]
        policy: PolicyFlags,
        /// Start it once defined.
        #[arg(long)]
        start: bool,
    },
    /// Change a defined VM: the flags given replace what the definition says (--disk,
    /// --net and --numa replace the whole list), validated by vireod. A running VM
    /// keeps running as it is; the change applies at its next start.
    Set {
        name: String,
        #[command(flatten)]
        vm: api::config::VmFlags,
        #[command(flatten)]
        policy: PolicyFlags,
    },
    /// Resize a running VM's memory now: virtio-mem above its boot memory, the balloon
    /// below it (a Dynamic Memory VM within its minimum..maximum; the balancer moves
    /// it again afterwards). A size the VM cannot reach is refused.
    Resize {
        name: String,
        /// The memory it should have (e.g. 1G, 1536M): a multiple of 2 MiB.
        #[arg(long)]
        memory: String,
    },
    /// Edit a VM's definition (JSON) in $EDITOR (default vi); vireod validates it.
    /// Invalid JSON or a refused definition: edit again or give up (nothing changes).
    Edit {
        name: String,
    },
    /// Shut a running VM down the guest's way (ACPI power button); a guest that has not
    /// powered off after --timeout is stopped (as `vm stop`).
    Shutdown {
        name: String,
        /// Seconds the guest gets (vireod's --stop-timeout-s if not given).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Reboot the guest's way: `vm shutdown` (same --timeout), then `vm start`.
    Reboot {
        name: String,
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Reset a running or paused VM (the machine's reset button: the guest is not
    /// asked); it runs again in the same VMM.
    Reset {
        name: String,
    },
    /// Start the VM when vireod starts (its priority; medium unless --priority), or
    /// with --disable not (priority off).
    Autostart {
        name: String,
        #[arg(long)]
        disable: bool,
        #[arg(long, value_enum, conflicts_with = "disable")]
        priority: Option<Priority>,
    },
    /// Start a VM; returns when it runs. With --selector: the clustered VMs it
    /// selects that are off are asked to run (the cluster places them).
    Start {
        #[arg(required_unless_present = "selector")]
        name: Option<String>,
        /// Clustered VMs by KEY=VALUE[,KEY=VALUE] over priority, node and class.
        #[arg(long, conflicts_with = "name")]
        selector: Option<String>,
        /// With --selector: start those that have a place, leave the others.
        #[arg(long, requires = "selector")]
        force: bool,
        /// NAME is a clustered VM that is off or saved: the cluster places it (a saved
        /// one resumes where it was on whichever node it is placed).
        #[arg(long, requires = "name", conflicts_with = "selector")]
        cluster: bool,
    },
    /// Shut a VM down (killed after the timeout). With --selector: the clustered VMs
    /// it selects are turned off (their nodes kill their VMMs) and stay off.
    Stop {
        name: Option<String>,
        /// Seconds before the VM is killed (vireod's default if not given).
        #[arg(long, conflicts_with = "selector")]
        timeout: Option<u64>,
        /// Clustered VMs by KEY=VALUE[,KEY=VALUE] over priority, node and class.
        #[arg(long, conflicts_with = "name")]
        selector: Option<String>,
    },
    /// Save VMs (Hyper-V's Save): each one's memory and device state go to disk and
    /// its VMM ends; `vm start` resumes the guest where it was. A clustered VM is
    /// saved by its owner (run this there) to the cluster's shared storage. With
    /// --selector: clustered VMs through the cluster (each owner saves its own).
    Save {
        names: Vec<String>,
        #[arg(long, required_unless_present = "names", conflicts_with = "names")]
        selector: Option<String>,
    },
    /// Delete a saved VM's saved state: it is Stopped and its next start boots afresh.
    DiscardSavedState {
        name: String,
        /// NAME is a saved clustered VM: its state on the shared storage is discarded
        /// cluster-wide (it is off).
        #[arg(long)]
        cluster: bool,
    },
    /// Kill a VM's VMM at once (virsh: destroy).
    #[command(visible_alias = "destroy")]
    Kill {
        name: String,
    },
    Pause {
        name: Option<String>,
    },
    Resume {
        name: Option<String>,
    },
    /// All VMs: state, priority, vCPUs, memory, pid, uptime, restarts.
    List {
        /// Only VMs in this state (running, stopped, paused, crashed, ...).
        #[arg(long)]
        state: Option<String>,
    },
    /// One VM: state, process, last exit, definition.
    Info {
        name: Option<String>,
    },
    /// One command to the guest's agent (qemu-guest-agent protocol; the definition
    /// needs guest_agent: true), as virsh qemu-agent-command: prints the guest's reply.
    GuestCommand {
        name: String,
        /// The command: guest-ping, guest-fsfreeze-freeze, guest-fsfreeze-thaw, ...
        execute: String,
        /// Its arguments, a JSON object.
        #[arg(long)]
        arguments: Option<String>,
        /// Seconds to wait for the guest (default 5, at most 100: vireoctl's own
        /// requests end after 120 s; the API takes up to 300).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// The guest's serial console: its output, and with --input (or --send) input.
    Console {
        name: String,
        /// Lines to show.
        #[arg(long, default_value_t = 50)]
        lines: usize,
        /// Keep printing new output.
        #[arg(long, short)]
        follow: bool,
        /// Send this text and a newline to the guest's serial port first.
        #[arg(long)]
        send: Option<String>,
        /// Interactive: what you type goes to the guest (the terminal in raw mode;
        /// Ctrl-] or the end of standard input ends it); output is followed.
        #[arg(long, short)]
        input: bool,
    },
    /// Live-migrate a running VM to another host's vireod (queued: at most
    /// --max-concurrent-migrations run at once on this host). Clustered VMs — several
    /// names, --selector, or a --to that is a cluster node's name or `auto` — are
    /// moved by the cluster: one queued move each, --concurrency at once per source
    /// and per destination node, High first (`vireoctl migration list --cluster`).
    Migrate {
        #[arg(required_unless_present = "selector")]
        names: Vec<String>,
        /// Clustered VMs by KEY=VALUE[,KEY=VALUE] over priority, node and class.
        #[arg(long, conflicts_with = "names")]
        selector: Option<String>,
        /// The destination's vireod (the VM then belongs to it): https://HOST:PORT (its
        /// peer listener, mutual TLS) or its socket on this host; or, for clustered
        /// VMs, a node's name or `auto` (placement picks).
        #[arg(long, required_unless_present = "to_url", conflicts_with = "to_url")]
        to: Option<String>,
        /// Clustered VMs: moves at once per source and per destination node (default 2).
        #[arg(long)]
        concurrency: Option<u32>,
        /// Clustered VMs: move those that have a place, leave the others (reported).
        #[arg(long)]
        force: bool,
        /// With an https:// --to: the host name its certificate must carry (default HOST).
        #[arg(long, requires = "to")]
        to_name: Option<String>,
        /// Or a `vireo` already listening (unix:/path, tcp:host:port); the VM is then
        /// forgotten here.
        #[arg(long)]
        to_url: Option<String>,
        /// Where the destination's VMM listens (default: a unix socket on its host).
        #[arg(long)]
        receiver_url: Option<String>,
        /// Downtime target in milliseconds.
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Compress memory pages (zstd).
        #[arg(long)]
        compress: bool,
        /// Bandwidth limit in MiB/s.
        #[arg(long)]
        bandwidth_mib_s: Option<u64>,
        /// Copy the disks too (shared-nothing); with --storage-dir on the destination.
        #[arg(long)]
        copy_storage: bool,
        #[arg(long)]
        storage_dir: Option<PathBuf>,
        /// Streams that carry memory pages (1..=16; default 1). Between hosts each is
        /// its own mutual TLS connection.
        #[arg(long)]
        connections: Option<u32>,
        /// Wait for the end, with a progress bar; fails if the migration does.
        #[arg(long, short)]
        wait: bool,
        /// With --wait: give up waiting after SECS and exit 124. The migration goes
        /// on (`vireoctl migration cancel` stops it).
        #[arg(long, value_name = "SECS", requires = "wait", value_parser = clap::value_parser!(u64).range(1..))]
        timeout: Option<u64>,
    },
    /// Resource metering since the last reset.
    Metrics {
        name: Option<String>,
        /// Start metering afresh.
        #[arg(long)]
        reset: bool,
    },
    /// Remove a stopped VM's definition and history (virsh: undefine).
    #[command(visible_alias = "undefine")]
    Delete {
        name: String,
    },
    /// The definitions as JSON (one VM, or all).
    Export {
        name: Option<String>,
    },
}

/// What vireod does with a VM (as `vm define` takes them).
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct PolicyFlags {
    /// Automatic start order when vireod starts (off: not started).
    #[arg(long, value_enum)]
    pub priority: Option<Priority>,
    /// What happens when its VMM ends without being asked to.
    #[arg(long, value_enum)]
    pub restart: Option<RestartPolicy>,
    /// Restarts in a row before the VM is left Crashed.
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// Relative CPU weight against the host's other VMs (1..=10000, default 100).
    #[arg(long)]
    pub cpu_weight: Option<u32>,
    /// What vireod does with the VM when it stops its VMs (Hyper-V's automatic stop
    /// action): turn-off (default), shutdown (the guest's way), or save.
    #[arg(long, value_enum)]
    pub stop_action: Option<api::host::StopAction>,
    /// Dynamic Memory (Hyper-V's): min=SIZE,max=SIZE[,startup=SIZE,buffer=PCT,weight=N]
    /// (buffer default 20 %, weight 0..=10000 default 5000), or off. vireod's
    /// balancer then moves the VM's memory between min and max by what the guest uses.
    #[arg(long, value_name = "min=..,max=..|off")]
    pub dynamic_memory: Option<String>,
}

pub(crate) fn name_of(n: &Option<String>) -> Result<&str, CtlError> {
    n.as_deref()
        .ok_or_else(|| CtlError::Usage("a VM name is required (or --vm-socket PATH)".into()))
}

pub(crate) fn read_definition(
    file: &Path,
    priority: Option<Priority>,
    restart: Option<RestartPolicy>,
    max_restarts: Option<u32>,
) -> Result<Value, CtlError> {
    let text = if file == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|source| {
            CtlError::Read {
                path: file.to_path_buf(),
                source,
            }
        })?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|source| CtlError::Read {
            path: file.to_path_buf(),
            source,
        })?
    };
    let v: Value = serde_json::from_str(&text).map_err(|source| CtlError::Json {
        path: file.to_path_buf(),
        source,
    })?;
    let mut def = if v.get("config").is_some() {
        v
    } else {
        serde_json::json!({ "config": v })
    };
    if let Some(p) = priority {
        def["priority"] = p.as_str().into();
    }
    if let Some(r) = restart {
        def["restart"] = r.as_str().into();
    }
    if let Some(m) = max_restarts {
        def["max_restarts"] = m.into();
    }
    Ok(def)
}

/// Direct access to one VMM's own API (no vireod).
pub(crate) fn direct(ctx: &Ctx, cmd: &VmCommand, out: Output) -> Result<(), CtlError> {
    let (method, route) = match cmd {
        VmCommand::Info { .. } => ("GET", "vm.info"),
        VmCommand::Pause { .. } => ("PUT", "vm.pause"),
        VmCommand::Resume { .. } => ("PUT", "vm.resume"),
        VmCommand::Stop { .. } => ("PUT", "vm.shutdown"),
        VmCommand::Metrics { .. } => ("GET", "vm.counters"),
        _ => {
            return Err(CtlError::Usage(
                "with --vm-socket only info, pause, resume, stop and metrics are available".into(),
            ))
        }
    };
    let v = ctx.json(method, &format!("/api/v1/{route}"), None)?;
    match (out, &v) {
        (_, Value::Null) => {}
        (Output::Json, v) => print_json(v),
        (Output::Table, Value::Object(m)) if route == "vm.info" => {
            let get = |k: &str| {
                m.get(k)
                    .map(|x| x.to_string().trim_matches('"').to_string())
                    .unwrap_or_default()
            };
            print_pairs(&[
                ("state", get("state")),
                ("memory", get("memory_actual_size")),
                ("uptime_ms", get("uptime_ms")),
            ]);
        }
        (Output::Table, Value::Object(m)) => {
            let mut rows = Vec::new();
            for (dev, c) in m {
                if let Some(c) = c.as_object() {
                    for (k, x) in c {
                        rows.push(vec![dev.clone(), k.clone(), x.to_string()]);
                    }
                }
            }
            print_table(&["DEVICE", "COUNTER", "VALUE"], &rows);
        }
        (Output::Table, v) => print_json(v),
    }
    Ok(())
}

pub(crate) fn vm(ctx: &Ctx, cmd: VmCommand, out: Output) -> Result<(), CtlError> {
    // A bad name is refused here, before any request: vireod's own rule.
    for n in names_in(&cmd) {
        agent::model::validate_name(n).map_err(|e| CtlError::Usage(e.to_string()))?;
    }
    let path = |n: &str, verb: &str| {
        if verb.is_empty() {
            format!("/api/v1/vms/{n}")
        } else {
            format!("/api/v1/vms/{n}/{verb}")
        }
    };
    let show_status = |v: Value| super::definitions::show_status(v, out);
    match cmd {
        VmCommand::Define {
            name,
            file,
            priority,
            restart,
            max_restarts,
            cluster,
            preferred_owners,
            possible_owners,
            anti_affinity,
            no_start,
            cpu_compat,
        } => {
            let def = read_definition(&file, priority, restart, max_restarts)?;
            // Checked here too, for an error that points at the file.
            if let Err(e) = serde_json::from_value::<VmDefinition>(def.clone()) {
                return Err(CtlError::Usage(format!(
                    "{}: invalid VM definition: {e}",
                    file.display()
                )));
            }
            if cluster {
                let priority = match priority.unwrap_or(Priority::Medium) {
                    Priority::Off => "no_auto_start",
                    p => p.as_str(),
                };
                let req = serde_json::json!({
                    "definition": def,
                    "priority": priority,
                    "preferred_owners": preferred_owners,
                    "possible_owners": possible_owners,
                    "anti_affinity": anti_affinity,
                    "cpu_compat": cpu_compat,
                    "start": !no_start,
                });
                let v = ctx.json(
                    "PUT",
                    &format!("/api/v1/cluster/vms/{name}"),
                    Some(req.to_string().into_bytes()),
                )?;
                print_json(&v);
                return Ok(());
            }
            let v = ctx.json("PUT", &path(&name, ""), Some(def.to_string().into_bytes()))?;
            show_status(v)
        }
        VmCommand::Start {
            selector: Some(sel),
            force,
            ..
        } => {
            let ask = bulk::Ask {
                op: "start",
                selector: Some(&sel),
                force,
                ..Default::default()
            };
            bulk::request(ctx, ask, out)
        }
        VmCommand::Start {
            name: Some(name),
            cluster: true,
            ..
        } => {
            let ask = bulk::Ask {
                op: "start",
                names: std::slice::from_ref(&name),
                ..Default::default()
            };
            bulk::request(ctx, ask, out)
        }
        VmCommand::Start { name, .. } => {
            show_status(ctx.json("PUT", &path(name_of(&name)?, "start"), None)?)
        }
        VmCommand::Stop {
            selector: Some(sel),
            ..
        } => {
            let ask = bulk::Ask {
                op: "stop",
                selector: Some(&sel),
                ..Default::default()
            };
            bulk::request(ctx, ask, out)
        }
        VmCommand::Save {
            names,
            selector: None,
        } => {
            for name in &names {
                show_status(ctx.json("PUT", &path(name, "save"), None)?)?;
            }
            Ok(())
        }
        VmCommand::DiscardSavedState {
            name,
            cluster: true,
        } => {
            let v = ctx.json(
                "DELETE",
                &format!("/api/v1/cluster/vms/{name}/saved-state"),
                None,
            )?;
            match out {
                Output::Json => print_json(&v),
                Output::Table => println!("{name}: saved state discarded; off"),
            }
            Ok(())
        }
        VmCommand::DiscardSavedState { name, .. } => {
            show_status(ctx.json("DELETE", &path(&name, "saved-state"), None)?)
        }
        VmCommand::Save { names, selector } => {
            let ask = bulk::Ask {
                op: "save",
                names: &names,
                selector: selector.as_deref(),
                ..Default::default()
            };
            bulk::request(ctx, ask, out)
        }
        VmCommand::Stop { name, timeout, .. } => {
            let n = name_of(&name)?;
            let q = timeout
                .map(|t| format!("?timeout_s={t}"))
                .unwrap_or_default();
            show_status(ctx.json("PUT", &(path(n, "stop") + &q), None)?)
        }
        VmCommand::Kill { name } => show_status(ctx.json("PUT", &path(&name, "kill"), None)?),
        VmCommand::Create {
            name,
            vm,
            policy,
            start,
        } => definitions::create(ctx, &name, &vm, &policy, start, out),
        VmCommand::Set { name, vm, policy } => definitions::set(ctx, &name, &vm, &policy, out),
        VmCommand::Edit { name } => definitions::edit(ctx, &name, out),
        VmCommand::Resize { name, memory } => super::memory::resize(ctx, &name, &memory, out),
        VmCommand::Autostart {
            name,
            disable,
            priority,
        } => definitions::autostart(ctx, &name, disable, priority, out),
        VmCommand::Shutdown { name, timeout } => {
            power::shutdown(ctx, &name, timeout, out).map(drop)
        }
        VmCommand::Reboot { name, timeout } => power::reboot(ctx, &name, timeout, out),
        VmCommand::Reset { name } => show_status(ctx.json("PUT", &path(&name, "reset"), None)?),
        VmCommand::Pause { name } => {
            show_status(ctx.json("PUT", &path(name_of(&name)?, "pause"), None)?)
        }
        VmCommand::Resume { name } => {
            show_status(ctx.json("PUT", &path(name_of(&name)?, "resume"), None)?)
        }
        VmCommand::Info { name } => {
            show_status(ctx.json("GET", &path(name_of(&name)?, ""), None)?)
        }
        VmCommand::List { state } => list(ctx, state.as_deref(), out),
        VmCommand::Console {
            name,
            lines,
            follow,
            send,
            input,
        } => console(ctx, &name, lines, follow || input, send, input),
        VmCommand::GuestCommand {
            name,
            execute,
            arguments,
            timeout,
        } => guest_command(ctx, &name, execute, arguments.as_deref(), timeout),
        VmCommand::Migrate {
            names,
            selector,
            to,
            concurrency,
            force,
            wait,
            timeout,
            ..
        } if selector.is_some()
            || names.len() > 1
            || to.as_deref().is_some_and(bulk::is_cluster_target) =>
        {
            let ask = bulk::Ask {
                op: "migrate",
                names: &names,
                selector: selector.as_deref(),
                to: to.as_deref(),
                force,
                concurrency,
                wait,
                timeout: timeout.map(Duration::from_secs),
            };
            bulk::request(ctx, ask, out)
        }
        VmCommand::Migrate {
            names,
            to,
            to_name,
            to_url,
            receiver_url,
            downtime_ms,
            compress,
            bandwidth_mib_s,
            copy_storage,
            storage_dir,
            connections,
            wait,
            timeout,
            ..
        } => {
            let [name] = names.as_slice() else {
                return Err(CtlError::Usage(
                    "a migration to another host's vireod takes one VM".into(),
                ));
            };
            let to = match to {
                Some(p) if p.starts_with("https://") => Some(p),
                Some(p) => Some(
                    std::path::absolute(&p)
                        .map_err(|source| CtlError::Read {
                            path: p.clone().into(),
                            source,
                        })?
                        .to_string_lossy()
                        .into_owned(),
                ),
                None => None,
            };
            let body = serde_json::json!({
                "destination_agent": to,
                "destination_name": to_name,
                "destination_url": to_url,
                "receiver_url": receiver_url,
                "downtime_ms": downtime_ms,
                "compress": compress,
                "bandwidth_mib_s": bandwidth_mib_s,
                "copy_storage": copy_storage,
                "storage_dir": storage_dir,
                "connections": connections,
            });
            let v = ctx.json(
                "PUT",
                &path(name, "migrate"),
                Some(body.to_string().into_bytes()),
            )?;
            let rec: MigrationRecord =
                serde_json::from_value(v.clone()).map_err(|e| CtlError::Api(e.to_string()))?;
            if !wait {
                match out {
                    Output::Json => print_json(&v),
                    Output::Table => println!("migration {} of {name}: {:?}", rec.id, rec.state),
                }
                return Ok(());
            }
            let done = follow_migration(ctx, &rec.id, out, timeout.map(Duration::from_secs))?;
            match done.state {
                MigrationState::Completed => Ok(()),
                s => Err(CtlError::Api(format!(
                    "migration {} {}: {}",
                    done.id,
                    format!("{s:?}").to_lowercase(),
                    done.error.unwrap_or_default()
                ))),
            }
        }
        VmCommand::Metrics { name, reset } => {
            let n = name_of(&name)?;
            if reset {
                ctx.call("PUT", &path(n, "metrics/reset"), None)?;
            }
            let v = ctx.json("GET", &path(n, "metrics"), None)?;
            match out {
                Output::Json => print_json(&v),
                Output::Table => match serde_json::from_value::<MeteringReport>(v.clone()) {
                    Ok(m) => metrics_table(&m),
                    Err(_) => print_json(&v),
                },
            }
            Ok(())
        }
        VmCommand::Delete { name } => {
            ctx.call("DELETE", &path(&name, ""), None)?;
            if out == Output::Table {
                println!("deleted {name}");
            }
            Ok(())
        }
        VmCommand::Export { name } => {
            let v = match name {
                Some(n) => ctx
                    .json("GET", &path(&n, ""), None)?
                    .get("definition")
                    .cloned()
                    .unwrap_or(Value::Null),
                None => ctx.json("GET", "/api/v1/export", None)?,
            };
            print_json(&v);
            Ok(())
        }
    }
}

/// The VM names a command carries (checked before anything is sent).
fn names_in(cmd: &VmCommand) -> Vec<&str> {
    match cmd {
        VmCommand::Define { name, .. }
        | VmCommand::Create { name, .. }
        | VmCommand::Set { name, .. }
        | VmCommand::Edit { name }
        | VmCommand::Resize { name, .. }
        | VmCommand::Shutdown { name, .. }
        | VmCommand::Reboot { name, .. }
        | VmCommand::Reset { name }
        | VmCommand::Autostart { name, .. }
        | VmCommand::Kill { name }
        | VmCommand::DiscardSavedState { name, .. }
        | VmCommand::Console { name, .. }
        | VmCommand::GuestCommand { name, .. }
        | VmCommand::Delete { name } => vec![name.as_str()],
        VmCommand::Start { name, .. }
        | VmCommand::Stop { name, .. }
        | VmCommand::Pause { name }
        | VmCommand::Resume { name }
        | VmCommand::Info { name }
        | VmCommand::Metrics { name, .. }
        | VmCommand::Export { name } => name.iter().map(String::as_str).collect(),
        VmCommand::Save { names, .. } | VmCommand::Migrate { names, .. } => {
            names.iter().map(String::as_str).collect()
        }
        VmCommand::List { .. } => Vec::new(),
    }
}

/// `vm guest-command NAME EXECUTE [--arguments JSON] [--timeout S]`: the guest's reply.
fn guest_command(
    ctx: &Ctx,
    name: &str,
    execute: String,
    arguments: Option<&str>,
    timeout: Option<u64>,
) -> Result<(), CtlError> {
    let arguments = arguments
        .map(|a| {
            serde_json::from_str::<Value>(a)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| CtlError::Usage(format!("--arguments {a:?}: not a JSON object")))
        })
        .transpose()?;
    let timeout_ms = timeout
        .map(|t| {
            (1..=100)
                .contains(&t)
                .then_some(t * 1000)
                .ok_or_else(|| CtlError::Usage(format!("--timeout {t}: 1 to 100 seconds")))
        })
        .transpose()?;
    let req = api::GuestCommandRequest {
        execute,
        arguments,
        timeout_ms,
    };
    let body = serde_json::to_vec(&req).map_err(|e| CtlError::Usage(e.to_string()))?;
    let reply = ctx.json(
        "POST",
        &format!("/api/v1/vms/{name}/guest-command"),
        Some(body),
    )?;
    print_json(&reply);
    Ok(())
}

/// `vm list [--state S]`: the VMs with their vCPUs and memory (from their definitions).
fn list(ctx: &Ctx, state: Option<&str>, out: Output) -> Result<(), CtlError> {
    let wanted = state
        .map(|s| {
            VmState::ALL
                .into_iter()
                .find(|v| v.as_str().eq_ignore_ascii_case(s))
                .ok_or_else(|| {
                    let all: Vec<String> = VmState::ALL
                        .iter()
                        .map(|v| v.as_str().to_lowercase())
                        .collect();
                    CtlError::Usage(format!("--state {s}: expected one of {}", all.join(", ")))
                })
        })
        .transpose()?;
    let v = ctx.json("GET", "/api/v1/vms", None)?;
    let list: Vec<VmStatus> =
        serde_json::from_value(v).map_err(|e| CtlError::Api(e.to_string()))?;
    let list: Vec<VmStatus> = list
        .into_iter()
        .filter(|s| wanted.is_none_or(|w| s.state == w))
        .collect();
    if out == Output::Json {
        print_json(&serde_json::to_value(&list).map_err(|e| CtlError::Api(e.to_string()))?);
        return Ok(());
    }
    let defs: std::collections::BTreeMap<String, VmDefinition> =
        serde_json::from_value(ctx.json("GET", "/api/v1/export", None)?)
            .map_err(|e| CtlError::Api(e.to_string()))?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let def = defs.get(&s.name);
            vec![
                s.name.clone(),
                s.state.to_string(),
                s.priority.to_string(),
                def.map_or("-".into(), |d| d.config.cpus.boot.to_string()),
                super::memory::memory_cell(s.memory.as_ref(), def),
                s.pid.map(|p| p.to_string()).unwrap_or("-".into()),
                if s.pid.is_some() {
                    fmt_ms_ago(s.started_at_ms)
                } else {
                    "-".into()
                },
                s.restarts.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME", "STATE", "PRIORITY", "VCPUS", "MEMORY", "PID", "UPTIME", "RESTARTS",
        ],
        &rows,
    );
    Ok(())
}
