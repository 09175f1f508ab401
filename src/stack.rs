//! Giving back the stack pages a reader thread no longer needs.
//!
//! A reader's deepest moment is its start: the WebSocket handshake and the
//! first read of history go a few pages deeper than anything it does after,
//! in a loop that, for an idle client, just waits in `read()`. The kernel
//! keeps every page ever touched, so each idle client would carry those
//! pages for its whole life. Once the deep work is done, the pages below the
//! current stack pointer hold nothing live, and `madvise(MADV_DONTNEED)`
//! returns them (the kernel hands out zeroed pages if they are touched
//! again). With thousands of idle clients this is about 8 KiB each.

/// Stack kept below the current frame: nothing below the stack pointer is
/// live (but the 128-byte red zone), so this margin is only there to spare
/// the next few calls a page fault.
const KEEP_BELOW: usize = 4 * 1024;

/// Releases the unused part of the calling thread's stack. Linux with glibc
/// only; elsewhere, and on any error, it does nothing.
pub fn release_unused() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let here = 0u8;
        let sp = std::ptr::addr_of!(here) as usize;
        // SAFETY: pthread_getattr_np fills `attr` for the calling thread,
        // which is destroyed after use; madvise only touches whole pages of
        // this thread's own stack that lie more than KEEP_BELOW under the
        // live frames, where nothing is stored.
        unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
                return;
            }
            let mut low: *mut libc::c_void = std::ptr::null_mut();
            let mut size: libc::size_t = 0;
            let got = libc::pthread_attr_getstack(&attr, &mut low, &mut size);
            libc::pthread_attr_destroy(&mut attr);
            if got != 0 {
                return;
            }
            let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
            let low = (low as usize).div_ceil(page) * page;
            let high = sp.saturating_sub(KEEP_BELOW) / page * page;
            if high > low {
                libc::madvise(low as *mut libc::c_void, high - low, libc::MADV_DONTNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deep(n: u32) -> u64 {
        // black_box: an optimised build must not fold the frames away.
        let buffer = std::hint::black_box([n as u8; 1024]);
        if n == 0 {
            buffer.iter().map(|&b| u64::from(b)).sum()
        } else {
            deep(n - 1) + u64::from(buffer[3])
        }
    }

    #[test]
    fn a_thread_keeps_working_after_its_stack_is_trimmed() {
        let result = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let before = deep(64);
                release_unused();
                let after = deep(64);
                release_unused();
                (before, after)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(result.0, result.1);
    }

    /// Resident pages of the calling thread's stack from its low end up to
    /// `high`, by `mincore`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn resident_stack_pages(high: usize) -> usize {
        // SAFETY: as in release_unused; mincore only reports on pages of
        // this thread's own stack mapping, into a vector of the right size.
        unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0);
            let mut low: *mut libc::c_void = std::ptr::null_mut();
            let mut size: libc::size_t = 0;
            assert_eq!(libc::pthread_attr_getstack(&attr, &mut low, &mut size), 0);
            libc::pthread_attr_destroy(&mut attr);
            let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
            let low = (low as usize).div_ceil(page) * page;
            let high = high / page * page;
            let mut resident = vec![0u8; (high - low) / page];
            let got = libc::mincore(
                low as *mut libc::c_void,
                high - low,
                resident.as_mut_ptr().cast(),
            );
            assert_eq!(got, 0, "mincore: {}", std::io::Error::last_os_error());
            resident.iter().filter(|&&page| page & 1 != 0).count()
        }
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_pages_below_the_live_frames_are_given_back() {
        let (before, after) = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                deep(64);
                let here = 0u8;
                // Well below this frame and the calls that measure.
                let high = std::ptr::addr_of!(here) as usize - 4 * KEEP_BELOW;
                let before = resident_stack_pages(high);
                release_unused();
                (before, resident_stack_pages(high))
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(
            before >= 8,
            "deep() left only {before} resident pages: the test measures nothing"
        );
        assert_eq!(
            after, 0,
            "{after} of {before} resident stack pages were not given back"
        );
    }
}
