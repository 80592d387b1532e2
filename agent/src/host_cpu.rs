//! This host's CPU features as a live migration compares them: what a cluster node
//! publishes (`NodeRecord::cpuid`) so that live moves go only between nodes whose
//! VMMs give guests the same CPUID (the destination VMM refuses any other).

use std::sync::OnceLock;

use migration::protocol::cpuid_fingerprint;

/// KVM's supported CPUID (what `vireo` gives vCPUs), its feature leaves as one string;
/// read once. None without a usable `/dev/kvm` (the node then restricts nothing).
pub fn fingerprint() -> Option<String> {
    static ONCE: OnceLock<Option<String>> = OnceLock::new();
    ONCE.get_or_init(read).clone()
}

fn read() -> Option<String> {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "no /dev/kvm: this node publishes no CPU fingerprint");
            return None;
        }
    };
    let cpuid = match kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "KVM_GET_SUPPORTED_CPUID failed: no CPU fingerprint");
            return None;
        }
    };
    let leaves = vireo_util::cpu_features::feature_leaves_of(cpuid.as_slice());
    Some(cpuid_fingerprint(&leaves))
}

#[cfg(test)]
mod tests {
    /// This machine has /dev/kvm (the VMM tests need it too): its fingerprint lists
    /// the feature leaves, sorted, and is read once.
    #[test]
    fn the_fingerprint_lists_the_feature_leaves_in_order() {
        if !std::path::Path::new("/dev/kvm").exists() {
            skip_without_kvm();
            return;
        }
        let f = super::fingerprint().expect("a fingerprint where /dev/kvm is");
        let leaves: Vec<&str> = f
            .split(',')
            .map(|l| l.split(':').next().unwrap_or(""))
            .collect();
        assert!(leaves.starts_with(&["1.0", "7.0"]), "{f}");
        assert!(leaves.iter().all(|l| !l.is_empty()));
        assert_eq!(super::fingerprint().as_deref(), Some(f.as_str()));
    }

    /// Outside CI a machine without KVM skips; under CI it fails (as every test that
    /// cannot run, see vireo_e2e::skip_or_fail_under_ci).
    fn skip_without_kvm() {
        assert!(
            std::env::var("CI").is_err(),
            "no /dev/kvm under CI: the fingerprint cannot be read"
        );
        eprintln!("SKIP: no /dev/kvm");
    }
}
