// The service's public jobs API (/api/v1), with the bearer token from sessionStorage (never in URLs or logs).

const TOKEN_KEY = "medsam2hitl.token";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY) || "",
  set: (value) => (value ? sessionStorage.setItem(TOKEN_KEY, value) : sessionStorage.removeItem(TOKEN_KEY)),
};

/** An API failure with the service's own one-line explanation. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}) {
  const value = token.get();
  return value ? { ...extra, Authorization: `Bearer ${value}` } : extra;
}

async function request(method, path, { body, json, signal } = {}) {
  let response;
  try {
    response = await fetch(`/api/v1${path}`, {
      method, signal,
      headers: headers(json !== undefined ? { "Content-Type": "application/json" } : body ? { "Content-Type": "application/octet-stream" } : {}),
      body: json !== undefined ? JSON.stringify(json) : body,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "lost the connection to the service: check that it is running, then retry");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch { /* not JSON */ }
    if (response.status === 401) detail = `${detail} — enter the service's token above`;
    throw new ApiError(response.status, `${response.status}: ${detail}`);
  }
  return response;
}

export const api = {
  /** The server's version, models and workers, and its CT window presets (name → [width, level] in HU). */
  models: async () => (await request("GET", "/models")).json(),
  createJob: async (bytes) => (await request("POST", "/jobs", { body: bytes })).json(),
  /** A job from a series of the service's DICOMweb server (the service fetches it; `study` may be omitted). */
  createDicomwebJob: async (series, study) => (await request("POST", "/jobs", { json: { dicomweb: { series, study } } })).json(),
  /** The image series on the service's DICOMweb server, without patient data; 503 when it has none. */
  pacsSeries: async () => (await request("GET", "/dicomweb/series")).json(),
  /** The job's volume file as the worker reads it. */
  volume: async (job) => (await request("GET", `/jobs/${job}/volume`)).arrayBuffer(),
  deleteJob: (job) => request("DELETE", `/jobs/${job}`),
  status: async (job) => (await request("GET", `/jobs/${job}/status`)).json(),
  segment: async (job, params) => (await request("POST", `/jobs/${job}/segment-2d`, { json: params })).json(),
  propagate: async (job, params) => (await request("POST", `/jobs/${job}/propagate`, { json: params })).json(),
  writeSlice: async (job, params) => (await request("PUT", `/jobs/${job}/slices`, { json: params })).json(),
  /** Ask the job's worker to encode a slice ahead ({view, slice, window}); answered at once (202). */
  prefetch: async (job, params) => (await request("POST", `/jobs/${job}/prefetch`, { json: params })).json(),
  cancel: async (job) => (await request("POST", `/jobs/${job}/cancel`, { json: {} })).json(),
  /** The 3D mask of the job's `object` (or of all its objects); a .seg.nrrd's segment gets `name` and `color`
   * ("rrggbb") when given. */
  result: async (job, format, { object, name, color } = {}) => {
    const query = new URLSearchParams({ format });
    if (object) query.set("object", object);
    if (name) query.set("segment_name", name);
    if (color) query.set("segment_color", color);
    return (await request("GET", `/jobs/${job}/result?${query}`)).blob();
  },
};

/**
 * Follow the job's Server-Sent Events from `after` until `until` says stop; on a lost connection, resume
 * from the last event seen (Last-Event-ID) after a pause, telling `onRetry` each time.
 */
export async function followEvents(job, after, onEvent, { until, onRetry, signal }) {
  let cursor = after;
  for (;;) {
    try {
      const response = await request("GET", `/jobs/${job}/events?after=${encodeURIComponent(cursor)}`, { signal });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) throw new ApiError(0, "the event stream closed");
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = { kind: "message", data: null, id: null };
          for (const line of block.split("\n")) {
            if (line.startsWith("id: ")) event.id = line.slice(4);
            else if (line.startsWith("event: ")) event.kind = line.slice(7);
            else if (line.startsWith("data: ")) event.data = JSON.parse(line.slice(6));
          }
          if (event.data === null) continue;
          if (event.id) cursor = event.id;
          onEvent(event);
          if (until(event)) { reader.cancel(); return; }
        }
      }
    } catch (error) {
      if (error.name === "AbortError") throw error;
      if (error instanceof ApiError && error.status >= 400 && error.status !== 503) throw error;
      onRetry(error);
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
}
