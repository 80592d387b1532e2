//! The VM's command-line flags, shared by `vireo` and `vireoctl vm create|set`: one
//! syntax and one parser per flag (the `parse_*` beside each type), wherever a VM is
//! described on a command line.

use std::path::PathBuf;

use super::{
    parse_balloon, parse_cpus, parse_disk, parse_memory, parse_net, parse_output_capped,
    parse_user_device, ConfigError, CpusConfig, MemoryConfig, OutputConfig, PayloadConfig,
    VmConfig,
};

/// What a command line says about a VM. Every flag is optional: [`VmFlags::config`]
/// fills in the defaults for a new VM, [`VmFlags::apply`] changes only what is given.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct VmFlags {
    /// Kernel to boot: a PVH ELF (vmlinux, the Vireo test guest).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line ('' for none).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Initial ramdisk ('' for none).
    #[arg(long, value_parser = path_or_none)]
    pub initramfs: Option<PathBuf>,
    /// vCPUs: N or boot=N[,topology=SOCKETS:CORES:THREADS] (the product must be N; APIC IDs follow the topology; at most 254 vCPUs)[,features=LEAF.SUB:HEX+...] (processor compatibility: the most CPU features the vCPUs get, a fingerprint as `vm.info` shows with its leaves joined by +; it must keep the x86-64 baseline). Default 1.
    #[arg(long)]
    pub cpus: Option<String>,
    /// A virtual NUMA node: node=N,cpus=0-3[:8-11],memory=SIZE[,host_node=H][,distances=M@D[:M@D...]] (repeatable; vCPU indices, not APIC IDs; nodes take consecutive RAM in node order and their memory adds up to --memory's size; host_node binds the node's memory to that host node with mbind; distances go to the SLIT, 10 local, 20 by default).
    #[arg(long)]
    pub numa: Vec<String>,
    /// A virtio-balloon (off: none): size=SIZE (asked back at start; vm.resize changes it)[,deflate_on_oom=on][,free_page_reporting=on][,stats_interval=SECONDS] (default 1; 0: no statistics). Pages the guest gives go back to the host (madvise); not with hugepages.
    #[arg(long)]
    pub balloon: Option<String>,
    /// Memory: SIZE or size=SIZE[,hugepages=on[,hugepage_size=2M|1G]][,overcommit=on] (huge pages are reserved from the host pool at start; overcommit: SIZE may exceed the host's RAM, only what the guest touches is backed)[,shared=on] (memfd-backed RAM a vhost-user backend can map; needed by --net vhost-user)[,hotplug_size=SIZE] (a virtio-mem region after RAM, plugged by the guest in 2 MiB blocks as vm.resize desired_ram asks). Default 512M.
    #[arg(long)]
    pub memory: Option<String>,
    /// A disk: path=FILE[,format=raw|vhdx][,readonly=on][,direct=on][,locking=off][,serial=S][,num_queues=N][,id=ID]
    /// [,poll_us=US][,bw_size=B,bw_refill_time=MS][,ops_size=N,ops_refill_time=MS]
    /// (repeatable; format is never guessed from the content: without format=, raw
    /// unless FILE ends in .vhdx; poll_us: how long a queue
    /// worker polls for the next request before it sleeps, default 50, 0 = never).
    #[arg(long)]
    pub disk: Vec<String>,
    /// Serial port (COM1): off, null, tty (the default) or file=PATH[,max_size=BYTES]
    /// (the file rotates to PATH.1 at max_size, default 16M). Without --kernel or
    /// --config, applies to the VM that arrives (--restore, vm.restore, an incoming
    /// migration) in place of its own configuration's.
    #[arg(long)]
    pub serial: Option<String>,
    /// virtio-console: off (the default), null, tty (stdout; input from stdin) or
    /// file=PATH[,max_size=BYTES] (rotates to PATH.1 at max_size, default 16M).
    #[arg(long)]
    pub console: Option<String>,
    /// A virtio-rng device: --rng (or --rng=on) adds it, --rng=off removes it.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "on",
          value_name = "on|off", value_parser = parse_rng)]
    pub rng: Option<bool>,
    /// A guest agent channel (the console's port `org.qemu.guest_agent.0`, where a
    /// guest's qemu-ga listens; see `vm.guest-command`): --guest-agent (or =on) adds
    /// it, --guest-agent=off removes it.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "on",
          value_name = "on|off", value_parser = parse_guest_agent)]
    pub guest_agent: Option<bool>,
    /// A network device on a host tap: tap=NAME[,mac=52:54:00:12:34:56][,id=ID]
    /// (repeatable; the tap is created if it does not exist, which needs
    /// CAP_NET_ADMIN; without mac= a random local one, kept by snapshots and
    /// migrations; default id net0, net1, ...).
    #[arg(long)]
    pub net: Vec<String>,
    /// A vfio-user device: socket=PATH[,id=ID] (repeatable; a PCI function emulated by
    /// the server listening on PATH, which maps guest memory: needs --memory ...,shared=on;
    /// default id user0, user1, ...).
    #[arg(long)]
    pub user_device: Vec<String>,
}

impl VmFlags {
    /// The new VM these flags describe, validated; None without `--kernel`. The
    /// serial port is `default_serial` unless `--serial` says otherwise.
    pub fn config(&self, default_serial: &str) -> Result<Option<VmConfig>, ConfigError> {
        let Some(kernel) = &self.kernel else {
            return Ok(None);
        };
        let (serial, serial_max_size) = parse_output_capped("--serial", default_serial)?;
        let mut cfg = VmConfig {
            payload: PayloadConfig {
                kernel: kernel.clone(),
                cmdline: None,
                initramfs: None,
            },
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            disks: Vec::new(),
            serial,
            console: OutputConfig::Off,
            serial_max_size,
            console_max_size: None,
            rng: false,
            guest_agent: false,
            nets: Vec::new(),
            user_devices: Vec::new(),
            write_lease: None,
            balloon: None,
            numa: Vec::new(),
        };
        self.apply(&mut cfg)?;
        cfg.validate()?;
        Ok(Some(cfg))
    }

    /// Changes `cfg` by the flags given; the rest keeps its value. `--disk`, `--net`
    /// and `--numa` replace the whole list they are part of; an empty `--cmdline` or
    /// `--initramfs`, `--balloon off` and `--rng=off` remove what they name. Not
    /// validated.
    pub fn apply(&self, cfg: &mut VmConfig) -> Result<(), ConfigError> {
        if let Some(k) = &self.kernel {
            cfg.payload.kernel = k.clone();
        }
        if let Some(c) = &self.cmdline {
            cfg.payload.cmdline = Some(c.clone()).filter(|c| !c.is_empty());
        }
        if let Some(i) = &self.initramfs {
            cfg.payload.initramfs = Some(i.clone()).filter(|i| !i.as_os_str().is_empty());
        }
        if let Some(c) = &self.cpus {
            cfg.cpus = parse_cpus(c)?;
        }
        if !self.numa.is_empty() {
            cfg.numa = self
                .numa
                .iter()
                .map(|n| crate::numa::parse_numa(n))
                .collect::<Result<_, _>>()?;
        }
        if let Some(b) = &self.balloon {
            cfg.balloon = match b.as_str() {
                "off" => None,
                b => Some(parse_balloon(b)?),
            };
        }
        if let Some(m) = &self.memory {
            cfg.memory = parse_memory(m)?;
        }
        if !self.disk.is_empty() {
            cfg.disks = self
                .disk
                .iter()
                .map(|d| parse_disk(d))
                .collect::<Result<_, _>>()?;
        }
        if let Some(s) = &self.serial {
            (cfg.serial, cfg.serial_max_size) = parse_output_capped("--serial", s)?;
        }
        if let Some(c) = &self.console {
            (cfg.console, cfg.console_max_size) = parse_output_capped("--console", c)?;
        }
        if let Some(rng) = self.rng {
            cfg.rng = rng;
        }
        if let Some(ga) = self.guest_agent {
            cfg.guest_agent = ga;
        }
        if !self.net.is_empty() {
            cfg.nets = self
                .net
                .iter()
                .map(|n| parse_net(n))
                .collect::<Result<_, _>>()?;
        }
        if !self.user_device.is_empty() {
            cfg.user_devices = self
                .user_device
                .iter()
                .map(|d| parse_user_device(d))
                .collect::<Result<_, _>>()?;
        }
        Ok(())
    }

    /// The flags given that describe a new VM (every one but `--serial`, which also
    /// applies to a VM that arrives), by name.
    pub fn new_vm_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--kernel", self.kernel.is_some()),
            ("--cmdline", self.cmdline.is_some()),
            ("--initramfs", self.initramfs.is_some()),
            ("--cpus", self.cpus.is_some()),
            ("--numa", !self.numa.is_empty()),
            ("--balloon", self.balloon.is_some()),
            ("--memory", self.memory.is_some()),
            ("--disk", !self.disk.is_empty()),
            ("--console", self.console.is_some()),
            ("--rng", self.rng.is_some()),
            ("--guest-agent", self.guest_agent.is_some()),
            ("--net", !self.net.is_empty()),
            ("--user-device", !self.user_device.is_empty()),
        ];
        given.iter().filter(|(_, g)| *g).map(|(n, _)| *n).collect()
    }

    /// No flag given.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A path, or '' (clap's own parser refuses an empty one).
fn path_or_none(v: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(v))
}

/// `--rng`'s value.
fn parse_rng(v: &str) -> Result<bool, ConfigError> {
    super::options::on_off("--rng", "rng", v)
}

/// `--guest-agent`'s value.
fn parse_guest_agent(v: &str) -> Result<bool, ConfigError> {
    super::options::on_off("--guest-agent", "guest_agent", v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> VmFlags {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            vm: VmFlags,
        }
        let mut argv = vec!["test"];
        argv.extend_from_slice(args);
        <Cli as clap::Parser>::parse_from(argv).vm
    }

    #[test]
    fn flags_make_the_config_the_parsers_make() {
        let f = flags(&[
            "--kernel",
            "/k",
            "--memory",
            "2G",
            "--cpus",
            "4",
            "--disk",
            "path=/d.vhdx",
            "--disk",
            "path=/e.raw,readonly=on",
            "--console",
            "null",
        ]);
        let c = f.config("off").unwrap().unwrap();
        assert_eq!(c.memory, parse_memory("size=2G").unwrap());
        assert_eq!(c.cpus, parse_cpus("boot=4").unwrap());
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[1], parse_disk("path=/e.raw,readonly=on").unwrap());
        assert_eq!(c.console, OutputConfig::Null);
        assert_eq!(c.serial, OutputConfig::Off);
        assert!(flags(&[]).config("tty").unwrap().is_none());
        let e = flags(&["--kernel", "/k", "--memory", "size=lots"])
            .config("tty")
            .unwrap_err();
        assert!(e.to_string().contains("--memory"), "{e}");
    }

    #[test]
    fn apply_changes_only_what_is_given() {
        let mut c = flags(&[
            "--kernel",
            "/k",
            "--disk",
            "path=/d",
            "--rng",
            "--cmdline",
            "x",
        ])
        .config("tty")
        .unwrap()
        .unwrap();
        let before = c.clone();
        let set = flags(&["--memory", "1G", "--cpus", "boot=2,topology=1:2:1"]);
        assert!(!set.is_empty());
        set.apply(&mut c).unwrap();
        assert_eq!(c.memory.size, 1 << 30);
        assert_eq!(c.cpus.boot, 2);
        assert_eq!(
            (&c.disks, c.rng, &c.payload),
            (&before.disks, true, &before.payload)
        );
        assert!(flags(&[]).is_empty());
    }

    #[test]
    fn empty_values_and_off_remove_what_they_name() {
        let mut c = flags(&[
            "--kernel",
            "/k",
            "--cmdline",
            "console=ttyS0",
            "--initramfs",
            "/i",
            "--rng",
            "--balloon",
            "size=1M",
        ])
        .config("tty")
        .unwrap()
        .unwrap();
        assert!(c.rng && c.balloon.is_some() && c.payload.initramfs.is_some());
        flags(&[
            "--cmdline",
            "",
            "--initramfs",
            "",
            "--rng=off",
            "--balloon",
            "off",
        ])
        .apply(&mut c)
        .unwrap();
        assert_eq!(
            (c.rng, c.balloon, c.payload.cmdline, c.payload.initramfs),
            (false, None, None, None)
        );
        let bad = <VmFlagsCli as clap::Parser>::try_parse_from(["t", "--rng=maybe"]);
        let e = bad.unwrap_err().to_string();
        assert!(e.contains("--rng") && e.contains("on or off"), "{e}");
    }

    #[derive(clap::Parser, Debug)]
    struct VmFlagsCli {
        #[command(flatten)]
        _vm: VmFlags,
    }
}
