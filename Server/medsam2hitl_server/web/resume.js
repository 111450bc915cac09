// Picking sessions up again: the tab remembers, per volume (keyed by a fingerprint of the file's bytes), which
// service jobs hold that volume's objects (sessionStorage: this tab only, gone when it closes; job ids and slice
// numbers, never the file's name or voxels). Opening another file never erases them, and reopening a file — after a
// reload or after working on another one — brings its objects' labels back from the service.

const SESSIONS_KEY = "medsam2hitl.sessions";
const MAX_VOLUMES = 20;  // the oldest volume's session is forgotten beyond this many

/** A fingerprint of a file's bytes (its length and an FNV-1a hash of up to 1 MiB sampled across it). */
export function fingerprint(bytes) {
  const view = new Uint8Array(bytes);
  const step = Math.max(1, Math.floor(view.length / (1 << 20)));
  let hash = 0x811c9dc5;
  for (let at = 0; at < view.length; at += step) hash = Math.imul(hash ^ view[at], 0x01000193) >>> 0;
  return `${view.length}:${hash.toString(16)}`;
}

function sessions() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SESSIONS_KEY));
    return saved && typeof saved === "object" && !Array.isArray(saved) ? saved : {};
  } catch {
    return {};
  }
}

/** Remember the objects (job, number, clicks, the user's slices) of the volume with fingerprint `print`; the volume
 * remembered last goes last, and the oldest beyond MAX_VOLUMES are forgotten. */
export function remember(print, objects, active) {
  const all = sessions();
  delete all[print];
  all[print] = { active, objects: objects.map((o) => ({ job: o.job, number: o.number, clicks: [...o.clicks],
    userSlices: [...o.userSlices] })) };
  const prints = Object.keys(all);
  prints.slice(0, Math.max(0, prints.length - MAX_VOLUMES)).forEach((old) => delete all[old]);
  sessionStorage.setItem(SESSIONS_KEY, JSON.stringify(all));
}

/** What was remembered for the volume with fingerprint `print`, or null. */
export function recall(print) {
  const saved = sessions()[print];
  return saved && Array.isArray(saved.objects) && saved.objects.length ? saved : null;
}

const NIFTI_TYPES = { 2: Uint8Array, 4: Int16Array, 512: Uint16Array, 8: Int32Array };

/** 0/1 labels in file order from the service's gzipped NIfTI result, checked against the file's dims (i, j, k). */
export async function labelsFromNifti(blob, dims) {
  const bytes = await new Response(blob.stream().pipeThrough(new DecompressionStream("gzip"))).arrayBuffer();
  const header = new DataView(bytes);
  const little = header.getInt32(0, true) === 348;
  const shape = [1, 2, 3].map((d) => header.getInt16(40 + 2 * d, little));
  if (shape.some((n, a) => n !== dims[a])) throw new Error(`its grid ${shape.join("x")} is not the volume's ${dims.join("x")}`);
  const Type = NIFTI_TYPES[header.getInt16(70, little)];
  if (!Type || (Type.BYTES_PER_ELEMENT > 1 && !little)) throw new Error("its voxel type is not one the viewer reads");
  const start = header.getFloat32(108, little);
  const values = new Type(bytes.slice(start, start + dims[0] * dims[1] * dims[2] * Type.BYTES_PER_ELEMENT));
  return Uint8Array.from(values, (v) => (v ? 1 : 0));
}
