//! A handler command's process tree, and the guarantee that it never outlives its run.
//!
//! A handler command may start processes of its own (`sh -c '(effect) & wait'`). Killing
//! only the direct child would leave those running after a timeout, and a worker that dies
//! (SIGKILL, OOM, `panic = abort`) would leave the whole tree running while another worker
//! takes the event over: two effects for one event. So every command runs under a small
//! *supervisor*, forked inside the spawn (between `fork` and `exec`, where std runs
//! `pre_exec` hooks):
//!
//! ```text
//! worker ──(control pipe)──▶ supervisor (subreaper, in the worker's process group)
//!                                └─ command (its own process group; dies with the supervisor)
//!                                     └─ whatever it starts (same group unless it leaves)
//! ```
//!
//! The supervisor waits for two things: the command's exit, or the end of the control pipe.
//! The worker holds the pipe's only write end; it closes when the worker stops the handler
//! (timeout, lost lease, shutdown deadline) *and* when the worker process dies for any
//! reason, since the kernel closes a dead process's descriptors. Either way the supervisor
//! stops the tree: SIGTERM to the command's group and to every orphan it adopted (it is a
//! child subreaper, so processes that left the group are reparented to it), then SIGKILL
//! after [`STOP_GRACE`]. When the command exits on its own, anything it left running is
//! stopped the same way: a handler's work ends when it exits. The supervisor then exits
//! with the command's status (re-raising its signal), so the worker sees the command's
//! outcome.
//!
//! `PR_SET_PDEATHSIG` alone would not do: it reaches only the direct child. A process group
//! alone would not do either: nobody is left to signal it when the worker dies.
//!
//! Everything in the forked supervisor is plain system calls (no allocation, no locks):
//! after `fork` in a multi-threaded process only async-signal-safe calls are sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// How long a stopped handler tree gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_millis(500);

/// How often the supervisor looks at the command and the control pipe.
const TICK_MILLIS: i32 = 20;

/// A command prepared to run under a supervisor; [`Supervision::spawned`] after `spawn`.
#[derive(Debug)]
pub struct Supervision {
    /// The supervisor's end: the child inherits it across fork; the parent's copy is closed
    /// once the child exists.
    read_end: OwnedFd,
    write_end: OwnedFd,
}

impl Supervision {
    /// The command was spawned: close the parent's copy of the supervisor's end and keep
    /// the worker's.
    pub fn spawned(self) -> TreeGuard {
        drop(self.read_end);
        TreeGuard {
            control: Some(self.write_end),
        }
    }
}

/// The worker's end of a supervised command: dropping it (or [`TreeGuard::stop`]) stops the
/// command's whole tree.
#[derive(Debug)]
pub struct TreeGuard {
    control: Option<OwnedFd>,
}

impl TreeGuard {
    /// Tell the supervisor to stop the tree now (SIGTERM, then SIGKILL after the grace).
    pub fn stop(&mut self) {
        self.control.take();
    }
}

/// Make `command` run under a supervisor (see the module docs). Call before `spawn`, then
/// [`Supervision::spawned`] once it succeeded.
pub fn supervise(command: &mut tokio::process::Command) -> io::Result<Supervision> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into the array on success. Both ends are
    // close-on-exec: the command and any other program this process starts never hold them.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let control_fd = read_end.as_raw_fd();
    // SAFETY: the hook runs in the forked child before exec and makes system calls only.
    unsafe {
        command.pre_exec(move || split_into_supervisor_and_command(control_fd));
    }
    Ok(Supervision {
        read_end,
        write_end,
    })
}

/// In the forked child: fork once more. The new process goes on to exec the command; this
/// one becomes its supervisor and never returns.
fn split_into_supervisor_and_command(control_fd: RawFd) -> io::Result<()> {
    // SAFETY (whole function): async-signal-safe system calls only, see the module docs.
    unsafe {
        let supervisor = libc::getpid();
        let command = libc::fork();
        if command < 0 {
            return Err(io::Error::last_os_error());
        }
        if command == 0 {
            // The command: its own process group, so its tree can be signalled at once, and
            // death with the supervisor should the supervisor itself be killed.
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            if libc::getppid() != supervisor {
                libc::_exit(126);
            }
            libc::close(control_fd);
            return Ok(());
        }
        run_supervisor(command, control_fd)
    }
}

/// The supervisor's life: wait for the command or the end of the control pipe, stop the
/// tree, exit as the command did.
unsafe fn run_supervisor(command: libc::pid_t, control_fd: RawFd) -> ! {
    unsafe {
        // Set the group from this side too: a stop arriving before the command ran its own
        // setpgid must still reach it.
        libc::setpgid(command, command);
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong);
        for signal in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
        ] {
            // Only the control pipe decides: a Ctrl-C in the worker's terminal starts the
            // worker's drain, which must not lose the handler underneath it.
            libc::signal(signal, libc::SIG_IGN);
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        close_all_but(control_fd);

        let mut status: Option<libc::c_int> = None;
        loop {
            reap(command, &mut status);
            if status.is_some() || control_closed(control_fd) {
                break;
            }
        }
        stop_tree(command, &mut status);
        exit_like(status)
    }
}

/// Close every descriptor but `keep`: the supervisor must not hold the worker's pipes (the
/// worker would wait for its output forever) nor another handler's control pipe (that
/// handler's supervisor would never see it close).
unsafe fn close_all_but(keep: RawFd) {
    unsafe {
        let keep = keep as libc::c_uint;
        let low = if keep == 0 {
            0
        } else {
            libc::syscall(
                libc::SYS_close_range,
                0 as libc::c_uint,
                keep - 1,
                0 as libc::c_uint,
            )
        };
        let high = libc::syscall(
            libc::SYS_close_range,
            keep + 1,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
        if low != 0 || high != 0 {
            // Kernels before 5.9 have no close_range.
            for fd in 0..65_536 {
                if fd != keep as RawFd {
                    libc::close(fd);
                }
            }
        }
    }
}

/// Wait up to one tick for the control pipe; true once its write end is closed (the worker
/// stopped the handler, or died).
unsafe fn control_closed(control_fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd: control_fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, TICK_MILLIS) };
    ready > 0 && poll.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

/// Reap every child that has ended; note the command's status when it is among them.
unsafe fn reap(command: libc::pid_t, status: &mut Option<libc::c_int>) {
    loop {
        let mut raw = 0;
        // SAFETY: a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if pid == command {
            *status = Some(raw);
        }
    }
}

/// SIGTERM to the command's group and every adopted orphan, then SIGKILL after the grace,
/// until nothing of the tree is left (or, if orphans cannot be listed, a bounded while).
unsafe fn stop_tree(command: libc::pid_t, status: &mut Option<libc::c_int>) {
    unsafe {
        if !signal_tree(command, libc::SIGTERM) {
            return;
        }
        let ticks = |d: Duration| (d.as_millis() as i32 / TICK_MILLIS).max(1);
        for _ in 0..ticks(STOP_GRACE) {
            sleep_tick();
            reap(command, status);
            if !signal_tree(command, 0) {
                return;
            }
        }
        for _ in 0..ticks(Duration::from_secs(2)) {
            if !signal_tree(command, libc::SIGKILL) {
                return;
            }
            sleep_tick();
            reap(command, status);
        }
    }
}

/// Send `signal` (0: just look) to the command's group and to this process's children.
/// True while any of them exists.
unsafe fn signal_tree(group: libc::pid_t, signal: libc::c_int) -> bool {
    unsafe {
        let group_alive = libc::kill(-group, signal) == 0;
        for_each_child(|pid| {
            libc::kill(pid, signal);
        });
        group_alive || has_children()
    }
}

/// True while this process has a child, ended or not (`waitid` answers ECHILD otherwise).
unsafe fn has_children() -> bool {
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) == 0
    }
}

/// Call `each` with every child of this (single-threaded) process, from
/// `/proc/self/task/<pid>/children`. Does nothing where that file does not exist.
unsafe fn for_each_child(mut each: impl FnMut(libc::pid_t)) {
    unsafe {
        let mut path = [0u8; 64];
        let head = b"/proc/self/task/";
        path[..head.len()].copy_from_slice(head);
        let mut len = head.len();
        len += write_decimal(&mut path[len..], libc::getpid() as u64);
        let tail = b"/children\0";
        path[len..len + tail.len()].copy_from_slice(tail);
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return;
        }
        let mut buffer = [0u8; 4096];
        let read = libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len());
        libc::close(fd);
        if read <= 0 {
            return;
        }
        let mut pid: libc::pid_t = 0;
        for &byte in &buffer[..read as usize] {
            if byte.is_ascii_digit() {
                pid = pid * 10 + libc::pid_t::from(byte - b'0');
            } else {
                if pid > 0 {
                    each(pid);
                }
                pid = 0;
            }
        }
        if pid > 0 {
            each(pid);
        }
    }
}

/// Write `n` in decimal at the start of `out`; returns the number of bytes written.
fn write_decimal(out: &mut [u8], mut n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..count {
        out[i] = digits[count - 1 - i];
    }
    count
}

unsafe fn sleep_tick() {
    // SAFETY: poll with no descriptors is a plain sleep.
    unsafe {
        libc::poll(std::ptr::null_mut(), 0, TICK_MILLIS);
    }
}

/// Exit with the command's status: its exit code, or death by the same signal.
unsafe fn exit_like(status: Option<libc::c_int>) -> ! {
    unsafe {
        match status {
            Some(raw) if libc::WIFEXITED(raw) => libc::_exit(libc::WEXITSTATUS(raw)),
            Some(raw) if libc::WIFSIGNALED(raw) => {
                let signal = libc::WTERMSIG(raw);
                libc::signal(signal, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signal);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::kill(libc::getpid(), signal);
                libc::_exit(128 + signal)
            }
            // Stopped before it could be reaped: report it killed.
            _ => libc::_exit(128 + libc::SIGKILL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::write_decimal;

    #[test]
    fn decimals_are_written_without_allocating() {
        let mut out = [0u8; 20];
        assert_eq!(write_decimal(&mut out, 0), 1);
        assert_eq!(&out[..1], b"0");
        let n = write_decimal(&mut out, 4_194_304);
        assert_eq!(&out[..n], b"4194304");
    }
}
