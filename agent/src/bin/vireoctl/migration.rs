//! `vireoctl migration ...` and the following of one live migration (`vm migrate --wait`).

use super::*;

#[derive(Subcommand, Debug)]
pub(crate) enum MigrationCommand {
    /// Every migration vireod knows: queued, running and finished.
    List {
        /// The cluster-wide queue instead: every move between nodes (drains',
        /// fail-backs', bulk requests') with its state and request.
        #[arg(long)]
        cluster: bool,
    },
    /// One migration with its progress.
    Info { id: String },
    /// Take a queued migration out of the queue (or give up an incoming one).
    Cancel {
        id: String,
        /// ID is a cluster bulk request: its moves not started yet are cancelled.
        #[arg(long)]
        cluster: bool,
    },
}

/// One line about a migration's progress.
pub(crate) fn progress_line(r: &MigrationRecord) -> String {
    match &r.progress {
        Some(p) if r.state == MigrationState::Running => format!(
            "round {}, {:.1} MiB sent, {} pages left, {:.0} MiB/s",
            p.rounds,
            p.bytes_sent as f64 / (1u64 << 20) as f64,
            p.remaining_pages,
            p.bandwidth_mib_s
        ),
        _ => format!("{:?}", r.state).to_lowercase(),
    }
}

/// Polls a migration until it ends, drawing a progress bar on a terminal (plain
/// lines at each state change otherwise); returns the final record.
pub(crate) fn follow_migration(
    ctx: &Ctx,
    id: &str,
    out: Output,
    timeout: Option<Duration>,
) -> Result<MigrationRecord, CtlError> {
    use std::io::IsTerminal;
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(100);
    if !std::io::stderr().is_terminal() || out == Output::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut last_state = None;
    loop {
        let v = ctx.json("GET", &format!("/api/v1/migrations/{id}"), None)?;
        let r: MigrationRecord =
            serde_json::from_value(v.clone()).map_err(|e| CtlError::Api(e.to_string()))?;
        bar.set_prefix(format!(
            "{} {}",
            r.vm,
            format!("{:?}", r.state).to_lowercase()
        ));
        bar.set_position(r.percent.round() as u64);
        bar.set_message(progress_line(&r));
        if last_state != Some(r.state) && bar.is_hidden() && out == Output::Table {
            eprintln!("migration {id} of {}: {}", r.vm, progress_line(&r));
        }
        last_state = Some(r.state);
        if r.state.finished() {
            bar.finish_and_clear();
            match out {
                Output::Json => print_json(&v),
                Output::Table => migration_table(&r),
            }
            return Ok(r);
        }
        if let Some(t) = timeout.filter(|t| started.elapsed() >= *t) {
            bar.finish_and_clear();
            return Err(CtlError::WaitTimedOut {
                what: format!("migration {id} of {}", r.vm),
                secs: t.as_secs(),
                state: progress_line(&r),
                hint: format!("vireoctl migration cancel {id}"),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn migration_table(r: &MigrationRecord) {
    let p = r.progress.clone().unwrap_or_default();
    print_pairs(&[
        ("id", r.id.clone()),
        ("vm", r.vm.clone()),
        ("direction", format!("{:?}", r.direction).to_lowercase()),
        ("peer", r.peer.clone()),
        ("state", format!("{:?}", r.state).to_lowercase()),
        ("progress", format!("{:.0} %", r.percent)),
        ("rounds", p.rounds.to_string()),
        (
            "sent",
            format!("{} pages, {} bytes", p.pages_sent, p.bytes_sent),
        ),
        ("downtime", format!("{:.1} ms", p.downtime_ms)),
        ("streams", r.streams.to_string()),
        ("queued at", fmt_time(Some(r.queued_at_ms))),
        ("started at", fmt_time(r.started_at_ms)),
        ("finished at", fmt_time(r.finished_at_ms)),
        ("receiver", r.receiver_url.clone().unwrap_or("-".into())),
        ("error", r.error.clone().unwrap_or("-".into())),
    ]);
}

pub(crate) fn migration(ctx: &Ctx, cmd: MigrationCommand, out: Output) -> Result<(), CtlError> {
    let (v, one) = match &cmd {
        MigrationCommand::List { cluster: true } => return bulk::list(ctx, out),
        MigrationCommand::Cancel { id, cluster: true } => return bulk::cancel(ctx, id, out),
        MigrationCommand::List { .. } => (ctx.json("GET", "/api/v1/migrations", None)?, false),
        MigrationCommand::Info { id } => (
            ctx.json("GET", &format!("/api/v1/migrations/{id}"), None)?,
            true,
        ),
        MigrationCommand::Cancel { id, .. } => (
            ctx.json("DELETE", &format!("/api/v1/migrations/{id}"), None)?,
            true,
        ),
    };
    if out == Output::Json {
        print_json(&v);
        return Ok(());
    }
    if one {
        let r: MigrationRecord =
            serde_json::from_value(v).map_err(|e| CtlError::Api(e.to_string()))?;
        migration_table(&r);
        return Ok(());
    }
    let list: Vec<MigrationRecord> =
        serde_json::from_value(v).map_err(|e| CtlError::Api(e.to_string()))?;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.vm.clone(),
                format!("{:?}", r.direction).to_lowercase(),
                format!("{:?}", r.state).to_lowercase(),
                format!("{:.0}%", r.percent),
                fmt_ms_ago(Some(r.queued_at_ms)),
                r.peer.clone(),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "VM",
            "DIRECTION",
            "STATE",
            "PROGRESS",
            "QUEUED",
            "PEER",
            "ERROR",
        ],
        &rows,
    );
    Ok(())
}
