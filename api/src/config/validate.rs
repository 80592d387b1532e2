//! [`VmConfig::validate`]: the checks serde cannot make (ranges and combinations).

use super::{ConfigError, OutputConfig, VmConfig, MAX_MEMORY, MAX_VCPUS, MIN_MEMORY};

impl VmConfig {
    /// `memory.hotplug_size`: whole virtio-mem blocks, normal private pages (unplugged
    /// blocks go back with madvise), RAM and region within the largest guest.
    fn validate_hotplug(&self) -> Result<(), ConfigError> {
        let Some(hotplug) = self.memory.hotplug_size else {
            return Ok(());
        };
        let block = super::HOTPLUG_BLOCK_SIZE;
        if hotplug == 0 || !hotplug.is_multiple_of(block) {
            return Err(ConfigError::Invalid(format!(
                "memory.hotplug_size ({hotplug} bytes) must be a non-zero multiple of the \
                 virtio-mem block size ({} MiB)",
                block >> 20
            )));
        }
        if self.memory.hugepages {
            return Err(ConfigError::Invalid(
                "memory.hotplug_size cannot be used with hugepages yet (virtio-mem gives \
                 unplugged blocks back with madvise on normal pages)"
                    .into(),
            ));
        }
        if self.memory.shared {
            return Err(ConfigError::Invalid(
                "memory.hotplug_size cannot be used with memory.shared yet (the hotplug \
                 region is private memory a vhost-user backend could not map)"
                    .into(),
            ));
        }
        if self.memory.size.saturating_add(hotplug) > MAX_MEMORY {
            return Err(ConfigError::Invalid(format!(
                "memory.size + memory.hotplug_size must be at most {} GiB, got {} GiB",
                MAX_MEMORY >> 30,
                self.memory.size.saturating_add(hotplug) >> 30
            )));
        }
        Ok(())
    }

    /// An empty path is named as such (not as a file that cannot be opened).
    fn no_empty_paths(&self) -> Result<(), ConfigError> {
        let empty = |p: &std::path::Path| p.as_os_str().is_empty();
        let mut named: Vec<(String, bool)> = vec![
            ("payload.kernel".into(), empty(&self.payload.kernel)),
            (
                "payload.initramfs".into(),
                self.payload.initramfs.as_deref().is_some_and(empty),
            ),
        ];
        for (what, out) in [("serial", &self.serial), ("console", &self.console)] {
            if let OutputConfig::File(p) = out {
                named.push((format!("{what}.file"), empty(p)));
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            named.push((format!("disks[{i}].path"), empty(&d.path)));
            named.push((
                format!("disks[{i}].replica_log"),
                d.replica_log.as_deref().is_some_and(empty),
            ));
        }
        match named.into_iter().find(|(_, is_empty)| *is_empty) {
            Some((field, _)) => Err(ConfigError::Invalid(format!(
                "{field} is empty: give a path"
            ))),
            None => Ok(()),
        }
    }

    /// Checks what serde cannot: ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.no_empty_paths()?;
        if self.cpus.boot == 0 || self.cpus.boot > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "cpus.boot must be 1..={MAX_VCPUS}, got {}",
                self.cpus.boot
            )));
        }
        if let Some(t) = self.cpus.topology {
            let product = u32::from(t.sockets) * u32::from(t.cores) * u32::from(t.threads);
            if t.sockets == 0
                || t.cores == 0
                || t.threads == 0
                || product != u32::from(self.cpus.boot)
            {
                return Err(ConfigError::Invalid(format!(
                    "cpus.topology {}:{}:{} (sockets:cores:threads) must multiply to cpus.boot {}",
                    t.sockets, t.cores, t.threads, self.cpus.boot
                )));
            }
            let highest = t.apic_id(u32::from(self.cpus.boot) - 1);
            if highest > u32::from(MAX_VCPUS) {
                return Err(ConfigError::Invalid(format!(
                    "cpus.topology {}:{}:{} needs APIC IDs up to {highest}; at most {MAX_VCPUS} \
                     (round cores and threads to powers of two, or use fewer sockets)",
                    t.sockets, t.cores, t.threads
                )));
            }
        }
        crate::numa::validate(&self.numa, self.cpus.boot, self.memory.size)?;
        if let Some(b) = &self.balloon {
            if b.size > self.memory.size {
                return Err(ConfigError::Invalid(format!(
                    "balloon.size ({} MiB) exceeds the VM's memory ({} MiB)",
                    b.size >> 20,
                    self.memory.size >> 20
                )));
            }
            if self.memory.hugepages {
                return Err(ConfigError::Invalid(
                    "a balloon cannot give back huge pages 4 KiB at a time; use it without hugepages".into(),
                ));
            }
            if self.memory.shared {
                return Err(ConfigError::Invalid(
                    "a balloon cannot give back shared memory (madvise does not free memfd \
                     pages); use it without memory.shared"
                        .into(),
                ));
            }
        }
        if self.memory.size < MIN_MEMORY {
            return Err(ConfigError::Invalid(format!(
                "memory.size must be at least 16M, got {} bytes",
                self.memory.size
            )));
        }
        if !self.memory.size.is_multiple_of(4096) {
            return Err(ConfigError::Invalid(
                "memory.size must be a multiple of 4 KiB".into(),
            ));
        }
        if self.memory.size > MAX_MEMORY {
            return Err(ConfigError::Invalid(format!(
                "memory.size must be at most {} GiB, got {} GiB",
                MAX_MEMORY >> 30,
                self.memory.size >> 30
            )));
        }
        if let Some(page) = self.memory.hugepage_size {
            if !self.memory.hugepages {
                return Err(ConfigError::Invalid(
                    "memory.hugepage_size needs hugepages=on".into(),
                ));
            }
            if page != 2 << 20 && page != 1 << 30 {
                return Err(ConfigError::Invalid(format!(
                    "memory.hugepage_size must be 2M or 1G, got {page} bytes"
                )));
            }
            if !self.memory.size.is_multiple_of(page) {
                return Err(ConfigError::Invalid(format!(
                    "memory.size ({} MiB) must be a multiple of the huge page size ({} MiB)",
                    self.memory.size >> 20,
                    page >> 20
                )));
            }
        }
        self.validate_hotplug()?;
        if self.memory.overcommit && self.memory.hugepages {
            return Err(ConfigError::Invalid(
                "memory.overcommit cannot be used with hugepages (a huge page the pool \
                 cannot give is a SIGBUS in the VMM, not a slower guest)"
                    .into(),
            ));
        }
        if self.memory.shared && self.memory.hugepages {
            return Err(ConfigError::Invalid(
                "memory.shared cannot be used with hugepages yet (shared memory is a \
                 memfd of normal pages)"
                    .into(),
            ));
        }
        if self.serial == OutputConfig::Tty && self.console == OutputConfig::Tty {
            return Err(ConfigError::Invalid(
                "serial and console cannot both be tty (one of them owns the terminal)".into(),
            ));
        }
        for (what, cap) in [
            ("serial_max_size", self.serial_max_size),
            ("console_max_size", self.console_max_size),
        ] {
            if cap == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "{what} must be at least 1 byte"
                )));
            }
        }
        let mut taps = std::collections::BTreeSet::new();
        for n in &self.nets {
            n.check_switch_options().map_err(ConfigError::Invalid)?;
            if n.switch.is_some() {
                continue;
            }
            if let Some(path) = &n.vhost_user {
                if !n.tap.is_empty() {
                    return Err(ConfigError::Invalid(
                        "a network device has either a tap or a vhost_user socket, not both".into(),
                    ));
                }
                if !path.is_absolute() {
                    return Err(ConfigError::Invalid(format!(
                        "vhost-user socket {} must be an absolute path",
                        path.display()
                    )));
                }
                if !self.memory.shared {
                    return Err(ConfigError::Invalid(format!(
                        "vhost-user network device {} needs shared guest memory \
                         (--memory ...,shared=on) so its backend can map it",
                        path.display()
                    )));
                }
                continue;
            }
            net::validate_tap_name(&n.tap).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if !taps.insert(n.tap.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "two network devices use tap {} (a tap serves one device)",
                    n.tap
                )));
            }
        }
        for u in &self.user_devices {
            if !u.socket.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "vfio-user socket {} must be an absolute path",
                    u.socket.display()
                )));
            }
            if !self.memory.shared {
                return Err(ConfigError::Invalid(format!(
                    "vfio-user device {} needs shared guest memory (--memory ...,shared=on) \
                     so its server can map it for DMA",
                    u.socket.display()
                )));
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for id in self.device_ids() {
            if !ids.insert(id.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "two devices have the id '{id}'"
                )));
            }
        }
        for d in &self.disks {
            d.rate_limiter
                .validate(&format!("disk {}", d.path.display()))?;
            if d.num_queues == 0 || d.num_queues > 16 {
                return Err(ConfigError::Invalid(format!(
                    "disk {}: num_queues must be 1..=16",
                    d.path.display()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_config_round_trips_and_validates() {
        let json = r#"{"payload":{"kernel":"/k"},"cpus":{"boot":2},"memory":{"size":268435456},
                      "disks":[{"path":"/d.vhdx"}],"serial":{"mode":"file","file":"/s"}}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.disks[0].num_queues, 1);
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let mut bad = c.clone();
        bad.cpus.boot = 0;
        assert!(bad.validate().is_err());
        assert!(
            serde_json::from_str::<VmConfig>(r#"{"payload":{"kernel":"/k"},"cpu":{}}"#).is_err()
        );
    }
}
