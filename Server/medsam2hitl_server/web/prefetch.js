// Encoding ahead: while the user is about to draw a box or click, the service encodes the slice on screen, so the
// prompt then costs only the mask decoder. A prefetch is a hint: the service drops it for any real request, and
// a failed one changes nothing for the user.
import { api } from "./api.js";

const SETTLE_MS = 300;  // the slice must stay on screen this long: scrolling through slices sends nothing

/**
 * A function to call whenever the slice on screen or the tool may have changed. `target()` says what to
 * prefetch now: { job, view, slice, window }, or null (another tool, something running, nothing loaded).
 * Debounced; at most one request in flight; the same slice is not sent twice in a row.
 */
export function prefetcher(target) {
  let timer = null;
  let inFlight = false;
  let sent = "";

  async function send() {
    timer = null;
    const wanted = target();
    const key = wanted && JSON.stringify(wanted);
    if (!wanted || key === sent) return;
    if (inFlight) {
      timer = setTimeout(send, SETTLE_MS);
      return;
    }
    inFlight = true;
    sent = key;
    try {
      const { job, ...slice } = wanted;
      await api.prefetch(job, slice);
    } catch {
      sent = "";  // e.g. a propagation started meanwhile (409): the next change tries again
    } finally {
      inFlight = false;
    }
  }

  return () => {
    clearTimeout(timer);
    timer = setTimeout(send, SETTLE_MS);
  };
}

/** Call `changed` after NiiVue's own location callback (and any set before this one) whenever the slice moves. */
export function onSliceMoved(nv, changed) {
  const before = nv.onLocationChange;
  nv.onLocationChange = (data) => {
    if (before) before(data);
    changed();
  };
}
