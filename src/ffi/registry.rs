//! Validate-then-pin: objects C refers to by address, kept alive by an
//! `Arc` while a call uses them, with a quarantine for retired addresses.
//!
//! A C-visible address is the address of a small block of memory the
//! library allocates (`M`: a handle's method table, or an opaque token),
//! the key of the live set. A call looks the key up and clones the `Arc`
//! under the set's lock, so a close racing with it can retire the key but
//! never free the value while the call uses it. Retired memory stays
//! allocated in a quarantine for a while, so its address is not handed
//! out again soon and a stale pointer is refused (and a call through a
//! stale handle's method table still lands in the library).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// How many retired blocks of memory a registry keeps allocated.
const QUARANTINE: usize = 4096;

/// The live objects `V` keyed by the address of their memory `M`.
pub(crate) struct Registry<M, V> {
    live: OnceLock<Mutex<HashMap<usize, Arc<V>>>>,
    retired: Mutex<VecDeque<Box<M>>>,
}

impl<M, V> Registry<M, V> {
    pub(crate) const fn new() -> Self {
        Registry {
            live: OnceLock::new(),
            retired: Mutex::new(VecDeque::new()),
        }
    }

    fn live(&self) -> MutexGuard<'_, HashMap<usize, Arc<V>>> {
        self.live
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            // Inserts and removes are single calls, never left half-done
            // by a panic, so a poisoned lock is still usable.
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `value` under the address of `memory`, which the registry
    /// owns from now on; returns that address.
    pub(crate) fn insert(&self, memory: Box<M>, value: V) -> *mut M {
        let address = Box::into_raw(memory);
        self.live().insert(address as usize, Arc::new(value));
        address
    }

    /// True when `address` is live.
    pub(crate) fn contains(&self, address: usize) -> bool {
        self.live().contains_key(&address)
    }

    /// The value at `address`, pinned; None when it is not live.
    pub(crate) fn get(&self, address: usize) -> Option<Arc<V>> {
        self.live().get(&address).cloned()
    }

    /// Retires `address`: removes it from the live set (once; None for an
    /// address that is not live) and moves its memory to the quarantine.
    /// Returns the value, which calls in flight may still hold.
    pub(crate) fn retire(&self, address: usize) -> Option<Arc<V>> {
        let value = self.live().remove(&address)?;
        // SAFETY: live addresses come from Box::into_raw in `insert`, and
        // an address leaves the live set once.
        let memory = unsafe { Box::from_raw(address as *mut M) };
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.push_back(memory);
        if retired.len() > QUARANTINE {
            retired.pop_front();
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::Registry;

    #[test]
    fn validate_then_pin() {
        let registry: Registry<u64, String> = Registry::new();
        let a = registry.insert(Box::new(0), "a".into()) as usize;
        let b = registry.insert(Box::new(0), "b".into()) as usize;
        assert_ne!(a, b);
        assert!(registry.contains(a) && registry.contains(b));
        assert!(!registry.contains(a ^ 0x10));
        let pinned = registry.get(a).expect("live");
        // Retired once: the value outlives the key while a call holds it.
        assert_eq!(registry.retire(a).as_deref().map(String::as_str), Some("a"));
        assert!(registry.retire(a).is_none());
        assert!(registry.get(a).is_none() && !registry.contains(a));
        assert_eq!(*pinned, "a");
        // A retired address is quarantined: a new key never reuses it.
        let c = registry.insert(Box::new(0), "c".into()) as usize;
        assert_ne!(c, a);
        assert_eq!(registry.get(b).as_deref().map(String::as_str), Some("b"));
    }
}
