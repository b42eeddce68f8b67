"""The vmdr exception tree. Every error knows its one-line message and its exit code.

::

    VmdrError                      exit 1   (a job failed)
    ├── UsageError                 exit 2   bad arguments or configuration
    │   └── ConfigError            exit 2
    │       └── CalendarError      exit 2   a schedule that is not a calendar event
    ├── RepositoryNotFound         exit 3
    ├── RepositoryExists           exit 3
    ├── WrongPassword              exit 4   no key slot opens with that passphrase / key file
    ├── RepositoryLocked           exit 5
    ├── IntegrityError             exit 6   MAC, hash or structure check failed
    │   └── ObjectNotFoundInRepo   exit 6   an object the repository references is missing
    ├── UnsupportedFormat          exit 7   written by a newer vmdr
    ├── StorageError               exit 8   backend I/O failed (network, timeout, permission)
    │   ├── ObjectNotFound         exit 8
    │   ├── TransientStorageError  exit 8   worth retrying
    │   ├── AuthenticationFailed   exit 8
    │   └── AppendOnlyViolation    exit 8   append-only mode refused a delete/replace
    ├── NoSpace                    exit 9   ENOSPC on a target or repository
    ├── HypervisorError            exit 10  libvirt / QEMU failures
    │   ├── DomainNotFound         exit 11
    │   ├── HypervisorUnavailable  exit 12
    │   ├── NetworkNotFound        exit 10
    │   ├── HypervisorUnsupported  exit 10  the driver or hypervisor lacks the operation
    │   ├── CheckpointMissing      exit 10
    │   ├── GuestAgentUnavailable  exit 10
    │   ├── HeartbeatTimeout       exit 10
    │   └── RemoteFailed           exit 10  a script on a remote host failed
    ├── VMLocked                   exit 13  another backup of that VM is running
    │   ├── RecoveryPlanLocked     exit 13  another failover/failback of the plan runs
    │   └── ReplicaInUse           exit 13  a VM runs on overlays over the replica's disks
    ├── SnapshotNotFound           exit 14
    ├── HookFailed                 exit 15
    ├── VerificationFailed         exit 16  a snapshot failed ``vmdr verify``
    ├── MigrationStopped           exit 17  instant restore's disk move stopped; VM paused
    ├── ServeError                 exit 1   the NBD server could not be started
    ├── BusyMount                  exit 1   the mounted filesystem is in use
    ├── UnsupportedFilesystem      exit 2   no filesystem vmdr can read at that place
    ├── InstantInterrupted         exit 130 instant recovery interrupted (resumable)
    ├── ReplicaStale               exit 40  replica older than its RPO target (--force)
    ├── FailoverFailed             exit 41  a failover step failed; sources left running
    ├── RecoveryCheckFailed        exit 42  `vmdr recovery check` found problems
    ├── DRCapacity                 exit 43  the DR host lacks the memory for the plan
    ├── NoPlacement                exit 44  no host can take the VM(s): nothing moved
    └── TapeError                  exit 30  a tape drive or changer failed
        ├── MediaRefused           exit 31  write-protected, another pool, retention, WORM
        ├── DriveNotReady          exit 32  the drive did not become ready in time
        ├── SlotEmpty              exit 33  no tape in that slot / no such tape
        ├── LabelUnreadable        exit 34  not a vmdr tape, or its label fails its check
        └── NoWritableMedia        exit 35  the pool has no tape it may write
    Interrupted (KeyboardInterrupt; SIGTERM and SIGHUP too) → exit 130

The table in ``docs/operations.md`` and ``vmdr --help`` lists the same codes.
"""

from __future__ import annotations


class VmdrError(Exception):
    """vmdr failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.__class__.__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(VmdrError):
    """Invalid usage."""

    exit_code = 2


class ConfigError(UsageError):
    """Invalid configuration."""


class CalendarError(ConfigError):
    """Invalid calendar event (systemd.time(7) syntax, e.g. "daily 02:00", "*:0/15")."""


class RepositoryNotFound(VmdrError):
    """No vmdr repository at that location."""

    exit_code = 3


class RepositoryExists(VmdrError):
    """A repository already exists at that location."""

    exit_code = 3


class WrongPassword(VmdrError):
    """Wrong passphrase or key file: no key slot of this repository opens with it."""

    exit_code = 4


class RepositoryLocked(VmdrError):
    """The repository is locked by another process."""

    exit_code = 5


class IntegrityError(VmdrError):
    """Repository data failed an integrity check."""

    exit_code = 6


class ObjectNotFoundInRepo(IntegrityError):
    """An object the repository references is missing."""


class UnsupportedFormat(VmdrError):
    """The repository was written by a newer vmdr format version."""

    exit_code = 7


class StorageError(VmdrError):
    """Storage backend I/O failed."""

    exit_code = 8


class ObjectNotFound(StorageError):
    """No such object in the storage backend."""


class TransientStorageError(StorageError):
    """A storage operation failed in a way that may succeed when retried."""


class AuthenticationFailed(StorageError):
    """The storage backend refused the credentials."""


class NoSpace(VmdrError):
    """No space left on the device."""

    exit_code = 9


class HypervisorError(VmdrError):
    """The hypervisor reported an error."""

    exit_code = 10


class DomainNotFound(HypervisorError):
    """No such virtual machine."""

    exit_code = 11


class HypervisorUnavailable(HypervisorError):
    """Cannot connect to libvirt."""

    exit_code = 12


class VMLocked(VmdrError):
    """Another vmdr job holds the lock of this virtual machine."""

    exit_code = 13


class SnapshotNotFound(VmdrError):
    """No such snapshot."""

    exit_code = 14


class HookFailed(VmdrError):
    """A hook script failed."""

    exit_code = 15


EXIT_OK = 0
EXIT_INTERRUPTED = 130

# One place that lists every exit code, for --help and the docs.
EXIT_CODES: list[tuple[int, str]] = [
    (0, "success"),
    (1, "a job failed or only partly succeeded"),
    (2, "usage or configuration error"),
    (3, "repository not found (or already exists, for init)"),
    (4, "wrong passphrase or key file"),
    (5, "repository locked by another process"),
    (6, "integrity error: corrupt or missing data"),
    (7, "unsupported (newer) repository format"),
    (8, "storage backend error (I/O, network, authentication)"),
    (9, "no space left on device"),
    (10, "hypervisor (libvirt/QEMU) error"),
    (11, "virtual machine not found"),
    (12, "cannot connect to libvirt"),
    (13, "another job holds this VM's lock"),
    (14, "snapshot not found"),
    (15, "a hook script failed"),
    (16, "a snapshot failed verification"),
    (17, "instant restore's disk move stopped; the VM is paused (resume it)"),
    (40, "a replica is older than its RPO target (planned failover refused; --force)"),
    (41, "a failover or failback step failed; the source VMs were left running"),
    (42, "vmdr recovery check found problems in a recovery plan"),
    (43, "the DR host lacks the memory for a recovery plan: failover refused (--force)"),
    (44, "no host can take the VM(s) (ha maintenance, ha test): nothing was moved"),
    (30, "tape drive or changer error"),
    (31, "tape refused: write-protected, another pool, retention or WORM"),
    (32, "tape drive not ready before the timeout"),
    (33, "changer slot empty or tape not found"),
    (34, "tape label unreadable (not a vmdr tape or failed its check)"),
    (35, "no writable tape in the pool"),
    (130, "interrupted (also SIGTERM and SIGHUP)"),
]


class CheckpointMissing(HypervisorError):
    """The checkpoint is missing from libvirt or its dirty bitmaps are gone."""


class NetworkNotFound(HypervisorError):
    """No such virtual network."""


class HypervisorUnsupported(HypervisorError):
    """The hypervisor (or its driver in vmdr) does not support this operation."""


class GuestAgentUnavailable(HypervisorError):
    """The QEMU guest agent does not answer."""


class HeartbeatTimeout(HypervisorError):
    """The virtual machine gave no sign of life before the timeout."""


class AppendOnlyViolation(StorageError):
    """The repository is append-only here: deleting or replacing objects is refused."""


class VerificationFailed(VmdrError):
    """A snapshot failed verification."""

    exit_code = 16


class UnsupportedFilesystem(VmdrError):
    """No filesystem vmdr can read there."""

    exit_code = 2


class RemoteFailed(HypervisorError):
    """A remote script exited with an error (``returncode`` tells which)."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class MigrationStopped(VmdrError):
    """Moving the disks to local storage stopped; the VM is paused."""

    exit_code = 17


class ServeError(VmdrError):
    """The NBD server could not be started."""


class BusyMount(VmdrError):
    """The filesystem is in use."""


class InstantInterrupted(VmdrError):
    """Instant recovery was interrupted."""

    exit_code = 130


class TapeError(VmdrError):
    """The tape drive or changer failed."""

    exit_code = 30


class MediaRefused(TapeError):
    """The tape may not be written (write-protected, another pool, retention or WORM)."""

    exit_code = 31


class DriveNotReady(TapeError):
    """The tape drive did not become ready before the timeout."""

    exit_code = 32


class SlotEmpty(TapeError):
    """The changer slot is empty, or no such tape is in the library."""

    exit_code = 33


class LabelUnreadable(TapeError):
    """The tape label is unreadable: not a vmdr tape, or it failed its check."""

    exit_code = 34


class NoWritableMedia(TapeError):
    """The pool has no tape it may write: label or free a tape."""

    exit_code = 35


class NoPlacement(VmdrError):
    """No host can take the VM(s) (maintenance, failover test): nothing was moved."""

    exit_code = 44


class RecoveryPlanLocked(VMLocked):
    """Another failover or failback of the same recovery plan is running."""

    exit_code = 13


class ReplicaStale(VmdrError):
    """A replica is older than its RPO target: a planned failover refuses (``--force``)."""

    exit_code = 40


class FailoverFailed(VmdrError):
    """A failover step failed; the source VMs were left (or put back) running."""

    exit_code = 41


class RecoveryCheckFailed(VmdrError):
    """``vmdr recovery check`` found problems in a recovery plan."""

    exit_code = 42


class DRCapacity(VmdrError):
    """The DR host lacks the memory for the recovery plan: nothing was stopped or started
    (``--force`` to try anyway)."""

    exit_code = 43


class ReplicaInUse(VMLocked):
    """A VM runs (or has its data) on overlays over the replica's standby disks (an HA
    copy started from the replica, a failover): nothing writes, reverts or rotates them."""

    exit_code = 13
