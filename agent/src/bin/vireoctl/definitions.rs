//! `vireoctl vm create|set|edit|autostart`: VM definitions from flags (the VMM's own
//! parsers, `api::config::VmFlags`), changed by flags, edited in $EDITOR, and the
//! automatic start; every one validated by vireod.

use std::io::BufRead;

use api::config::VmFlags;

use super::vm::PolicyFlags;
use super::*;

/// vireod's route for a changed definition.
fn definition_route(name: &str) -> String {
    format!("/api/v1/vms/{name}/definition")
}

/// Makes the paths a definition names absolute (vireod's working directory means
/// nothing to the caller): kernel, initramfs, disks, console file.
fn absolute_paths(cfg: &mut api::VmConfig) -> Result<(), CtlError> {
    let abs = |p: &mut PathBuf| -> Result<(), CtlError> {
        *p = std::path::absolute(&*p).map_err(|source| CtlError::Read {
            path: p.clone(),
            source,
        })?;
        Ok(())
    };
    abs(&mut cfg.payload.kernel)?;
    if let Some(i) = cfg.payload.initramfs.as_mut() {
        abs(i)?;
    }
    for d in &mut cfg.disks {
        abs(&mut d.path)?;
    }
    if let api::config::OutputConfig::File(f) = &mut cfg.console {
        abs(f)?;
    }
    Ok(())
}

fn apply_policy(def: &mut VmDefinition, p: &PolicyFlags) -> Result<(), CtlError> {
    if let Some(x) = p.priority {
        def.priority = x;
    }
    if let Some(x) = p.restart {
        def.restart = x;
    }
    if let Some(x) = p.max_restarts {
        def.max_restarts = x;
    }
    if let Some(x) = p.cpu_weight {
        def.cpu_weight = Some(x);
    }
    if let Some(x) = p.stop_action {
        def.stop_action = x;
    }
    if let Some(x) = &p.dynamic_memory {
        def.dynamic_memory = super::memory::parse_dynamic_memory(x, def.dynamic_memory.as_ref())?;
    }
    Ok(())
}

fn body_of(def: &VmDefinition) -> Result<Vec<u8>, CtlError> {
    serde_json::to_vec(def).map_err(|e| CtlError::Api(format!("cannot encode the definition: {e}")))
}

fn config_error(e: api::config::ConfigError) -> CtlError {
    CtlError::Usage(e.to_string())
}

/// `vm create NAME --kernel ... [--cpus N] [--memory SIZE] ...`: `PUT /api/v1/vms/NAME`
/// as `vm define` sends it.
pub(crate) fn create(
    ctx: &Ctx,
    name: &str,
    flags: &VmFlags,
    policy: &PolicyFlags,
    start: bool,
    out: Output,
) -> Result<(), CtlError> {
    let mut config = flags
        .config("tty")
        .map_err(config_error)?
        .ok_or_else(|| CtlError::Usage("vm create needs --kernel".into()))?;
    absolute_paths(&mut config)?;
    let mut def: VmDefinition = serde_json::from_value(serde_json::json!({ "config": config }))
        .map_err(|e| CtlError::Api(format!("cannot build the definition: {e}")))?;
    apply_policy(&mut def, policy)?;
    let v = ctx.json("PUT", &format!("/api/v1/vms/{name}"), Some(body_of(&def)?))?;
    let v = if start {
        ctx.json("PUT", &format!("/api/v1/vms/{name}/start"), None)?
    } else {
        v
    };
    show_status(v, out)
}

/// A VM's status as vireod answered it: its table, or the JSON asked for (or when it
/// is not a status).
pub(super) fn show_status(v: Value, out: Output) -> Result<(), CtlError> {
    match out {
        Output::Json => print_json(&v),
        Output::Table => match serde_json::from_value::<VmStatus>(v.clone()) {
            Ok(s) => status_table(&s),
            Err(_) => print_json(&v),
        },
    }
    Ok(())
}

/// The stored definition of VM `name`.
fn stored(ctx: &Ctx, name: &str) -> Result<VmDefinition, CtlError> {
    let st: VmStatus =
        serde_json::from_value(ctx.json("GET", &format!("/api/v1/vms/{name}"), None)?)
            .map_err(|e| CtlError::Api(format!("unexpected answer of vireod: {e}")))?;
    st.definition
        .ok_or_else(|| CtlError::Api(format!("vireod sent no definition of {name}")))
}

/// Sends a changed definition and says what came of it.
fn put_definition(ctx: &Ctx, name: &str, def: &VmDefinition, out: Output) -> Result<(), CtlError> {
    let v = ctx.json("PUT", &definition_route(name), Some(body_of(def)?))?;
    let pending = v["definition_pending"].as_bool().unwrap_or(false);
    match out {
        Output::Json => print_json(&v),
        Output::Table if pending => {
            println!("{name}: definition changed; the VM runs, so it applies at its next start")
        }
        Output::Table => println!("{name}: definition changed"),
    }
    Ok(())
}

/// `vm set NAME --memory 2G --cpus 4 ...`.
pub(crate) fn set(
    ctx: &Ctx,
    name: &str,
    flags: &VmFlags,
    policy: &PolicyFlags,
    out: Output,
) -> Result<(), CtlError> {
    if flags.is_empty()
        && policy.priority.is_none()
        && policy.restart.is_none()
        && policy.max_restarts.is_none()
        && policy.cpu_weight.is_none()
        && policy.stop_action.is_none()
        && policy.dynamic_memory.is_none()
    {
        return Err(CtlError::Usage(
            "vm set: nothing to change (give --memory, --cpus, --disk, --priority, ...)".into(),
        ));
    }
    let mut def = stored(ctx, name)?;
    let size = def.config.memory.size;
    flags.apply(&mut def.config).map_err(config_error)?;
    // --memory of a Dynamic Memory VM is its startup memory.
    if let Some(dm) = def.dynamic_memory.as_mut() {
        if def.config.memory.size != size {
            dm.startup = Some(def.config.memory.size);
        }
    }
    absolute_paths(&mut def.config)?;
    apply_policy(&mut def, policy)?;
    put_definition(ctx, name, &def, out)
}

/// `vm autostart NAME [--disable] [--priority P]`: vireod starts VMs of priority
/// high, medium and low when it starts; off ones not.
pub(crate) fn autostart(
    ctx: &Ctx,
    name: &str,
    disable: bool,
    priority: Option<Priority>,
    out: Output,
) -> Result<(), CtlError> {
    let mut def = stored(ctx, name)?;
    def.priority = match (disable, priority, def.priority) {
        (true, _, _) => Priority::Off,
        (false, Some(p), _) => p,
        (false, None, Priority::Off) => Priority::Medium,
        (false, None, p) => p,
    };
    put_definition(ctx, name, &def, out)
}

/// Why an edit is offered again (or given up).
enum Refusal {
    Json(String),
    Vireod(String),
}

/// `vm edit NAME`: the definition in $EDITOR, validated by vireod; an invalid edit
/// is offered again (on a terminal, if the user says so) or given up, the stored
/// definition unchanged.
pub(crate) fn edit(ctx: &Ctx, name: &str, out: Output) -> Result<(), CtlError> {
    let original = stored(ctx, name)?;
    let original_text = serde_json::to_string_pretty(&original)
        .map_err(|e| CtlError::Api(format!("cannot encode the definition: {e}")))?
        + "\n";
    let file = EditFile::create(name)?;
    let mut text = original_text.clone();
    loop {
        file.write(&text)?;
        run_editor(&file.path)?;
        text = file.read()?;
        if text == original_text {
            println!("{name}: no change");
            return Ok(());
        }
        let refusal = match api::json::from_slice::<VmDefinition>(text.as_bytes()) {
            Err(e) => Refusal::Json(e),
            Ok(def) => match ctx.json("PUT", &definition_route(name), Some(body_of(&def)?)) {
                Ok(v) => {
                    let pending = v["definition_pending"].as_bool().unwrap_or(false);
                    match out {
                        Output::Json => print_json(&v),
                        Output::Table if pending => println!(
                            "{name}: definition changed; the VM runs, so it applies at its next start"
                        ),
                        Output::Table => println!("{name}: definition changed"),
                    }
                    return Ok(());
                }
                Err(CtlError::Api(e)) if e.ends_with("(400)") => Refusal::Vireod(e),
                Err(e) => return Err(e),
            },
        };
        let why = match &refusal {
            Refusal::Json(e) => format!("not a valid definition: {e}"),
            Refusal::Vireod(e) => format!("vireod refused it: {e}"),
        };
        eprintln!("vireoctl: {name}: {why}");
        if !ask_again()? {
            return Err(CtlError::Usage(format!(
                "{name}: edit given up, the definition is unchanged ({why})"
            )));
        }
    }
}

/// "Edit again? [y/N]" on standard error, the answer from standard input (a line
/// starting with y). No answer (end of input) is no.
fn ask_again() -> Result<bool, CtlError> {
    eprint!("edit again? [y/N] ");
    let mut line = String::new();
    // A terminal answers interactively; a pipe answers too (scripts, tests).
    let read = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|source| CtlError::Read {
            path: PathBuf::from("standard input"),
            source,
        })?;
    Ok(read > 0 && line.trim_start().to_ascii_lowercase().starts_with('y'))
}

/// Runs `$EDITOR FILE` (or `vi`) through the shell, so that EDITOR may hold
/// arguments (`code --wait`).
fn run_editor(file: &Path) -> Result<(), CtlError> {
    let editor = std::env::var("VISUAL")
        .ok()
        .or_else(|| std::env::var("EDITOR").ok())
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "vi".into());
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file)
        .status()
        .map_err(|e| CtlError::Usage(format!("cannot run the editor {editor:?}: {e}")))?;
    if !status.success() {
        return Err(CtlError::Usage(format!(
            "the editor {editor:?} failed ({status}): the definition is unchanged"
        )));
    }
    Ok(())
}

/// The file being edited: private (0600), new, removed when done.
struct EditFile {
    path: PathBuf,
}

impl EditFile {
    fn create(name: &str) -> Result<Self, CtlError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!(
            "vireoctl-edit-{name}-{}-{}.json",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| CtlError::Read {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path })
    }

    fn write(&self, text: &str) -> Result<(), CtlError> {
        std::fs::write(&self.path, text).map_err(|source| CtlError::Read {
            path: self.path.clone(),
            source,
        })
    }

    fn read(&self) -> Result<String, CtlError> {
        std::fs::read_to_string(&self.path).map_err(|source| CtlError::Read {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for EditFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
