"""Calls that repeat an earlier call's launches.

A public op's host time is mostly Python that depends on its arguments' shapes and flags,
not on their data: the checks, the schedule's frequencies and amplitude, the dispatch, the
launches' specialization. An eager call whose arguments agree with an earlier call's in
everything but their tensors' data allocates that call's buffers again and makes its launches
again with its own tensors (`kernels.launch.recording`, `scratch`, `direct`), and skips the
rest. Where autograd records the call, the repeat runs inside the op's autograd.Function, and
the backward repeats its own launches the same way, keyed on the forward's key
(`ops._attention_backward`).

An op keys a call on all that its checks, schedule and launches read off the arguments but
data: each tensor's shape, strides, dtype, device and 16-byte alignment (`tensor_key`), each
other argument with its type (True passes checks that 1 fails), the schedule by identity and
field version (`schedule_key`). A key's first call only marks it `SEEN` (calls whose shapes
never come back, as a growing sequence's, pay no recording); its second runs in full under
`recording`, and `plan` finds every tensor among the launches' arguments (and descriptors'
bases) among the call's own by identity, the buffers it allocated (`scratch`: each written
whole by the launches, never by a torch operation) or views of either, or constants the key
fixes (a schedule's cached frequencies). A call whose launches read any other tensor (one that
torch operations made, such as a packed-documents tile table), one object the call passed
twice unless its key says so (q, k and v of self-attention), or a view of storage that two of
its tensors share (q, k and v sliced from one projection) never repeats: its key maps to
`NEVER`. Warnings of the checks (a layout that looks swapped) come
from a key's first two calls only; a schedule's subclass must change what its outputs depend
on through public fields (their setattr counts the version).
"""

import contextlib
from typing import Any, NamedTuple

import torch

from .kernels.launch import Descriptor, Recorded, direct, direct_stream, launch, recording
from .schedules.base import RopeSchedule

__all__ = ["NEVER", "SEEN", "Repeat", "Repeats", "clear", "first_names", "plan", "schedule_key", "tensor_key"]

NEVER = "never"  # a key whose calls run in full
SEEN = "seen"  # a key met once: its next call runs in full under `recording`


class Repeat(NamedTuple):
    """A recorded call's launches (on one device), with where each launch takes a tensor of
    the call: (argument index, name, view), view = None or the (storage offset from that
    tensor's, shape, strides) of a view of it, a descriptor's base where the recorded argument
    is a `Descriptor`; the buffers (name, shape, strides, dtype, device) allocated before each
    launch, at their first use, and the names of those released after it, at their last use
    (unless the caller reads them): a repeat's peak memory is the full call's."""

    launches: tuple[Recorded, ...]
    slots: tuple
    allocations: tuple
    releases: tuple
    device: int
    held: Any  # kept alive with the entry: the schedule whose id the key holds

    def __call__(self, tensors):
        """Make the launches on `tensors` (the call's own, by name) and the buffers, allocated
        into `tensors` as they come; return `tensors`, with the buffers the caller reads."""
        stream = direct_stream(self.device)
        for recorded, slots, allocations, releases in zip(self.launches, self.slots, self.allocations,
                                                          self.releases):
            for name, shape, strides, dtype, device in allocations:
                tensors[name] = torch.empty_strided(shape, strides, dtype=dtype, device=device)
            # on the C launcher, a pointer goes as an int: no view to make, no driver query
            pointers = stream is not None and recorded.entry[3] is not None
            args = list(recorded.args)
            for index, name, view in slots:
                tensor = tensors[name]
                if args[index] is None and pointers:
                    args[index] = tensor.data_ptr() + (0 if view is None else view[0] * tensor.element_size())
                    continue
                if view is not None:
                    tensor = tensor.as_strided(view[1], view[2], tensor.storage_offset() + view[0])
                args[index] = tensor if args[index] is None else Descriptor(tensor, *args[index][1:])
            if stream is None:
                launch(recorded.kernel, recorded.grid, *args, **recorded.kwargs)
            else:
                direct(recorded.entry, recorded.grid, args, stream)
            for name in releases:
                del tensors[name]
        return tensors


def tensor_key(t):
    """What a repeat reads off a tensor argument (None stays None); TypeError for a subclass
    or a non-tensor (such a call runs in full, and the checks say what is wrong)."""
    if t is None:
        return None
    if type(t) is not torch.Tensor:
        raise TypeError
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16


def first_names(names, values):
    """(named, same): {name: value} of the tensors among values, each object under the first
    name it came with (a repeat passes one object given twice by that name), and the tuple of,
    for each value, the index of the first value that is the same object (None for a
    non-tensor): a key holds it to say which were one object."""
    named, first, same = {}, {}, []
    for index, (name, value) in enumerate(zip(names, values)):
        if not isinstance(value, torch.Tensor):
            same.append(None)
            continue
        if id(value) not in first:
            first[id(value)] = index
            named[name] = value
        same.append(first[id(value)])
    return named, tuple(same)


_CACHES = []  # every `Repeats`, for `clear`


def clear():
    """Forget every recorded call: the next calls run in full (tests that patch the dispatch
    or the kernels' configs start from here; a key holds neither)."""
    for cache in _CACHES:
        cache.entries.clear()


def schedule_key(schedule):
    """What a repeat reads off a schedule: its identity and field version (None stays None);
    TypeError for a schedule whose frequencies can change without a field being set (one that
    does not cache them through `RopeSchedule.cached_inv_freq`, as CLEX, whose parameters
    train in place) or for a non-schedule: such calls run in full."""
    if schedule is None:
        return None
    if not isinstance(schedule, RopeSchedule) or type(schedule).cached_inv_freq is not RopeSchedule.cached_inv_freq:
        raise TypeError
    return id(schedule), getattr(schedule, "_version", 0)


class Repeats:
    """An op's keys: each maps to `SEEN` after its first call, then to the `Repeat` of its
    second (or `NEVER`); at most `limit` keys (cleared when full: a model makes few)."""

    def __init__(self, limit=256):
        self.limit, self.entries = limit, {}
        _CACHES.append(self)

    def get(self, key):
        """The `Repeat` of key (None: the call runs in full)."""
        entry = self._entry(key)
        return entry if type(entry) is Repeat else None

    def recording(self, key):
        """The context of a call of key that runs in full: `kernels.launch.recording` on the
        key's second call (it yields the record for `keep`), none otherwise (yielding None);
        the first call marks the key `SEEN`."""
        entry = self._entry(key)
        if entry is None:
            self._put(key, SEEN)
        return recording() if entry is SEEN else contextlib.nullcontext()

    def keep(self, key, record, named, outputs, constants=(), held=None):
        """After a call under `recording(key)`: the `plan` of its record (None: nothing to keep)."""
        if record is not None:
            self._put(key, plan(record, named, outputs, constants, held))

    def never(self, key):
        """A call of key ran without launches that repeat (the reference): its calls run in full."""
        if self._entry(key) is not NEVER:
            self._put(key, NEVER)

    def _entry(self, key):
        """key's entry; `NEVER` for a call without a key (None) or one whose key cannot be one
        (an unhashable argument: the call runs in full, and the checks say what is wrong)."""
        if key is None:
            return NEVER
        try:
            return self.entries.get(key)
        except TypeError:
            return NEVER

    def _put(self, key, value):
        if len(self.entries) >= self.limit:
            self.entries.clear()
        self.entries[key] = value


def _slot(tensor, named, buffers):
    """(name, view) of a launch's tensor argument among the call's tensors and buffers, or
    of a view of one of them (the only one of them on its storage); None where it is neither
    (a constant, or a tensor a repeat cannot make); NEVER where it is two of the call's
    tensors (one object passed twice, which the op's key must say) or a view whose owner is
    ambiguous (q, k and v slices of one fused buffer)."""
    candidates = [(name, t) for name, t in (*named.items(), *buffers.items()) if t is not None]
    names = [name for name, t in candidates if t is tensor]
    if len(names) > 1:
        return NEVER
    if names:
        return names[0], None
    root = _root(tensor)
    owners = [(name, t) for name, t in candidates if _root(t) is root]
    if not owners:
        return None
    if len(owners) > 1 or owners[0][1].dtype != tensor.dtype:
        return NEVER
    name, owner = owners[0]
    return name, (tensor.storage_offset() - owner.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def _root(tensor):
    """The tensor at the root of tensor's chain of views (PyTorch records the root for a view
    of a view)."""
    return tensor if tensor._base is None else tensor._base


def plan(record, named, outputs=(), constants=(), held=None):
    """The `Repeat` of a call's `recording` (record), or `NEVER` where a launch argument is a
    tensor that is none of `named` (the call's own tensors, which a repeat passes again), the
    call's `scratch` buffers (or their views) and `constants`, or where a launch has no
    compiled entry (the interpreter) or a buffer's name came twice. `outputs`: the names of
    the buffers that the caller reads after a repeat (kept to its end)."""
    scratch = dict(record.scratch)
    if (not record.launches or len(scratch) < len(record.scratch) or any(r.entry is None for r in record.launches)
            or len({r.device for r in record.launches}) > 1 or any(t.storage_offset() for t in scratch.values())):
        return NEVER
    slots = []
    for recorded in record.launches:
        launch_slots = []
        for index, arg in enumerate(recorded.args):
            tensor = arg.base if type(arg) is Descriptor else arg
            if not isinstance(tensor, torch.Tensor):
                continue
            slot = _slot(tensor, named, scratch)
            if slot is NEVER:
                return NEVER
            if slot is None:
                if not any(tensor is c for c in constants):
                    return NEVER
                continue
            launch_slots.append((index, *slot))
        slots.append(tuple(launch_slots))
    # the recorded call's own tensors leave the record (a repeat passes its own): it must not keep them alive
    launches = []
    for recorded, launch_slots in zip(record.launches, slots):
        args = list(recorded.args)
        for index, _, _ in launch_slots:
            args[index] = args[index]._replace(base=None) if type(args[index]) is Descriptor else None
        launches.append(recorded._replace(args=tuple(args)))
    # each buffer lives from its first launch to its last, as in the full call (where it came
    # or went with the Python names that held it)
    allocations, releases = [[] for _ in launches], [[] for _ in launches]
    for name, t in scratch.items():
        uses = [i for i, launch_slots in enumerate(slots) if any(slot[1] == name for slot in launch_slots)]
        allocations[uses[0] if uses else 0].append((name, tuple(t.shape), tuple(t.stride()), t.dtype, t.device))
        if uses and name not in outputs:
            releases[uses[-1]].append(name)
    return Repeat(tuple(launches), tuple(slots), tuple(map(tuple, allocations)), tuple(map(tuple, releases)),
                  record.launches[0].device, held)
