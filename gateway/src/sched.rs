//! CPU priority of background threads (Linux scheduling policies through `thread-priority`;
//! elsewhere every call is a no-op that succeeds).

/// How a background thread is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// Linux `SCHED_IDLE`: it runs only when nothing else wants the CPU, and a thread woken on
    /// its CPU takes the CPU at once (mirrors; the trace writer while it keeps up).
    Idle,
    /// `SCHED_OTHER` at nice ~10: a small share of a busy CPU, never none (the trace writer
    /// while its queue is filling). A running thread of this class keeps the CPU for the rest
    /// of its time slice (a few ms) before a woken request's thread gets it.
    Nice,
}

/// Moves the calling thread to `kind`. Errors: the operating system's refusal, as text; on
/// Linux a thread may always lower its priority, but leaving `SCHED_IDLE` for nice 10 needs
/// `CAP_SYS_NICE` or an `RLIMIT_NICE` of at least 10 (sched(7)).
pub fn set_current(kind: Background) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::unix::{
            set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy, ThreadSchedulePolicy,
        };
        let (policy, priority) = match kind {
            Background::Idle => {
                (ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle), thread_priority::ThreadPriority::Min)
            }
            // 25 of 0..=99 maps to nice 9 or 10 (the crate maps the range onto -20..=19).
            Background::Nice => (
                ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
                thread_priority::ThreadPriority::Crossplatform(
                    25u8.try_into().unwrap_or(thread_priority::ThreadPriorityValue::MIN),
                ),
            ),
        };
        set_thread_priority_and_policy(thread_native_id(), priority, policy).map_err(|e| format!("{e:?}"))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = kind;
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// `(policy, nice)` of the calling thread, from `/proc/thread-self/stat` (fields 41 and 19).
    fn current() -> (u32, i32) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..].split(' ').collect();
        (rest[41 - 3].parse().expect("policy"), rest[19 - 3].parse().expect("nice"))
    }

    #[test]
    fn a_thread_moves_between_idle_and_nice() {
        std::thread::spawn(|| {
            set_current(Background::Idle).expect("idle");
            assert_eq!(current().0, 5, "SCHED_IDLE");
            if let Err(e) = set_current(Background::Nice) {
                // Leaving SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE that allows nice 10.
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let root = status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
                assert!(!root, "root may always leave SCHED_IDLE: {e}");
                eprintln!("note: not root, and RLIMIT_NICE does not allow nice 10: {e}");
                return;
            }
            let (policy, nice) = current();
            assert_eq!(policy, 0, "SCHED_OTHER");
            assert!((9..=10).contains(&nice), "nice {nice}");
            // Back to idle: a lower priority is always allowed.
            set_current(Background::Idle).expect("idle again");
            assert_eq!(current().0, 5);
        })
        .join()
        .expect("the thread");
    }
}
