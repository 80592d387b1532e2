//! Locks that take a poisoned lock as it is.
//!
//! A panic on one of our threads ends the VM (or the process) by policy; the state
//! behind our locks is plain data whose every value is valid, so the threads still
//! running go on with it instead of panicking in turn.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// `m.lock()`, also when a thread panicked holding it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `l.read()`, also when a thread panicked holding it.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// `l.write()`, also when a thread panicked holding it.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// `m.into_inner()`, also when a thread panicked holding it.
pub fn into_inner<T>(m: Mutex<T>) -> T {
    m.into_inner().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_lock_poisoned_by_a_panicking_thread_still_gives_its_value() {
        let m = Arc::new(Mutex::new(7));
        let l = Arc::new(RwLock::new(8));
        let (m2, l2) = (m.clone(), l.clone());
        let r = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            let _w = l2.write().unwrap();
            panic!("poison both");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned() && l.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 8);
        *write(&l) += 1;
        assert_eq!(*read(&l), 9);
        let m = Arc::into_inner(m).unwrap();
        assert_eq!(into_inner(m), 8);
    }
}
