// The viewer: NiiVue shows the volume and the masks; every segmentation runs on the service (api.js).
import { Niivue, NVImage, SLICE_TYPE, DRAG_MODE } from "./vendor/niivue/index.js";
import { api, token, followEvents, ApiError } from "./api.js";
import { VoxelGrid, OVERLAP, decodeMask, encodeMask } from "./voxels.js";
import { fingerprint, remember, recall, labelsFromNifti } from "./resume.js";
import { seriesList } from "./series.js";
import { prefetcher, onSliceMoved } from "./prefetch.js";

const $ = (id) => document.getElementById(id);
const VIEW_NAMES = ["axial", "coronal", "sagittal"];
/** Where a volume's jobs come from: an opened file is uploaded; series.js opens PACS series with a source of its own
 * (`dicom`: its jobs have a DICOM SEG). */
const UPLOADED = { newJob: (bytes) => api.createJob(bytes), dicom: false };

const state = {
  bytes: null, name: "", print: "", grid: null, views: null,
  objects: [],   // {job, number (the object's number in that job), labels (file order, 0/1), voxels (how many
                 // labels are 1), clicks ("axis:slice" → [[x, y, 1 | 0]]), userSlices (the "axis:slice" the user
                 // made: they condition propagations)} per object; object n is pen value n + 1, named objectName(n),
                 // in objectColor(n)
  active: 0, box: null, tool: "box", running: null, history: [], future: [],
};

// NiiVue's own on-image information: orientation letters on all four sides, and a thin grey crosshair, a colour no
// object has (objects take the draw colour table's 1, 2, …: red, green, blue, yellow, …; overlaps are white)
const nv = new Niivue({ dragAndDropEnabled: false, backColor: [0, 0, 0, 1], crosshairColor: [0.6, 0.6, 0.6, 1],
  crosshairWidth: 0.3, isOrientationTextVisible: true, showAllOrientationMarkers: true,
  loadingText: "open a volume: the button, or drop a file" });
nv.drawLut.lut.set([255, 255, 255, 255], 4 * OVERLAP);  // before any volume: NiiVue uploads the table with it
await nv.attachTo("gl");
window.viewer = { state, nv };  // for the browser tests and the console
nv.opts.mouseEventConfig = { leftButton: { primary: DRAG_MODE.callbackOnly }, rightButton: DRAG_MODE.windowing,
  centerButton: DRAG_MODE.pan };

/** Object n's name, as the legend shows it and the .seg.nrrd download carries it. */
function objectName(n) {
  return `object ${n + 1}`;
}

/** Object n's colour ("rrggbb"): NiiVue's draw colour of its pen value, as the legend shows it and the .seg.nrrd
 * download carries it. */
function objectColor(n, value = n + 1) {
  return Array.from(nv.drawLut.lut.slice(4 * value, 4 * value + 3), (c) => c.toString(16).padStart(2, "0")).join("");
}

/** The service job that holds object n's labels: one job per volume, holding all its objects. */
function jobOf(n) {
  return state.objects[n].job;
}

/** Object n's number in its job: what each request about it names (a session saved before objects were numbered
 * had one job per object, its object 1). */
function numberOf(n) {
  return state.objects[n].number ?? 1;
}

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function failed(error) {
  if (error.name === "AbortError") return;
  say(error instanceof ApiError ? error.message : `unexpected error: ${error.message}`, true);
}

/** The service's name of the view along file array axis `axis` (axial, coronal, sagittal). */
function viewOf(axis) {
  return Object.keys(state.views).find((name) => state.views[name].array_axis === axis);
}

/** A slice's key in the page's maps and sets (history, clicks, the user's slices): "axis:index". */
function sliceKey(axis, index) {
  return `${axis}:${index}`;
}

/** [axis, index] of a sliceKey. */
function parseSliceKey(key) {
  return key.split(":").map(Number);
}

function ready() {
  return state.objects.length > 0 && state.grid !== null;
}

function refreshButtons() {
  const idle = ready() && !state.running;
  for (const id of ["segment", "propagate", "propagate-here", "new-object", "undo", "redo", "download-nii", "download-seg"]) {
    $(id).disabled = !idle;
  }
  $("segment").disabled = !idle || !state.box;
  $("undo").disabled = !idle || !state.history.length;
  $("redo").disabled = !idle || !state.future.length;
  $("cancel").disabled = !state.running;
  $("download-dicom-seg").hidden = !state.source?.dicom;
  $("download-dicom-seg").disabled = !idle;
  if (state.print) remember(state.print, state.objects, state.active);  // what a reload picks up again
  document.querySelectorAll("[data-tool]").forEach((b) => {
    b.classList.toggle("active", b.dataset.tool === state.tool);
    b.setAttribute("aria-pressed", String(b.dataset.tool === state.tool));
  });
  showUserSlices();
  showLegend();
  prefetchShown();  // the tool, the object or "running" may have changed
}

/** The legend on the image: each object's name, colour, volume (mL) and voxel count; the overlap colour. */
function showLegend() {
  const spacing = state.grid ? nv.volumes[0].hdr.pixDims.slice(1, 4) : [0, 0, 0];
  const voxelMl = Math.abs(spacing[0] * spacing[1] * spacing[2]) / 1000;
  const rows = state.objects.map((object, n) => `<li${n === state.active ? ' class="active"' : ""}>`
    + `<span class="swatch" style="background:#${objectColor(n)}"></span>${n === state.active ? "▸ " : ""}`
    + `${objectName(n)}: <span class="ml">${(object.voxels * voxelMl).toFixed(2)} mL</span> `
    + `(<span class="voxels">${object.voxels}</span> voxels)</li>`);
  if (state.objects.length > 1) {
    rows.push(`<li><span class="swatch" style="background:#${objectColor(0, OVERLAP)}"></span>overlap</li>`);
  }
  $("legend").innerHTML = rows.join("");
}

/** The active object's slices that the user made (they condition propagations), per view. */
function showUserSlices() {
  const object = state.objects[state.active];
  const byAxis = new Map();
  for (const [axis, index] of [...(object ? object.userSlices : [])].map(parseSliceKey)) {
    byAxis.set(axis, [...(byAxis.get(axis) || []), index]);
  }
  $("slices-text").textContent = byAxis.size ? `your slices: ${[...byAxis].map(([axis, slices]) =>
    `${viewOf(axis)} ${slices.sort((a, b) => a - b).join(", ")}`).join("; ")}` : "";
}

// ---- loading ----

/** The file read as a 3D scalar volume (not yet shown), or a one-line message saying what is wrong with it. */
async function readVolume(file, bytes) {
  let volume;
  try {
    volume = await NVImage.new(bytes.slice(0), file.name);
  } catch (error) {
    return `${file.name} could not be read as a volume (${error.message}): check the file`;
  }
  const dims = volume?.hdr?.dims;
  if (!dims || !volume.img) return `${file.name} could not be read as a volume (no image found in it): check the file`;
  const frames = dims.slice(4, Math.max(4, dims[0] + 1)).reduce((a, b) => a * Math.max(b, 1), 1);
  if (frames > 1) return `${file.name} has ${frames} frames (a 4D series): open a single 3D volume`;
  if (dims[0] < 3 || dims[3] < 2) return `${file.name} is a 2D image: open a 3D volume`;
  if ([128, 2304].includes(volume.hdr.datatypeCode)) {
    return `${file.name} holds colour (RGB) voxels: open a scalar (greyscale) volume`;
  }
  return volume;
}

async function openFile(file, source = UPLOADED) {
  if (!/\.(nii|nii\.gz|nrrd|nhdr|mha)$/i.test(file.name)) {
    say(`${file.name} is not a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) volume: open one of those`, true);
    return;
  }
  if (state.running) {  // its replies, events and slices belong to the volume shown
    say(`finish or cancel the ${state.running} first, then open ${file.name}`, true);
    return;
  }
  say(`reading ${file.name}…`);
  const bytes = await file.arrayBuffer();
  const volume = await readVolume(file, bytes);
  if (typeof volume === "string") {  // refused before anything is shown: the open volume and its objects stay
    say(volume, true);
    return;
  }
  nv.volumes.slice().forEach((v) => nv.removeVolume(v));
  nv.addVolume(volume);
  Object.assign(state, { bytes, name: file.name, print: "", grid: new VoxelGrid(nv.volumes[0]), views: null, objects: [],
    active: 0, box: null, history: [], future: [] });
  state.source = source;
  $("box-text").textContent = "drag a box on a slice";
  nv.createEmptyDrawing();
  applyOpacity();
  $("volume-name").textContent = file.name;
  $("window").value = $("window").value === "custom" ? "mr" : $("window").value;
  applyWindow();
  const print = fingerprint(bytes);
  const lost = await resumeObjects(recall(print));
  state.print = print;  // from here on the tab remembers this volume's objects instead
  if (state.objects.length) return;
  await addObject();
  if (lost) say("your last session's objects on this volume expired on the service: drag a box to start again");
}

/** Wait until the service has loaded the job's volume and holds no propagation (one may have been running when
 * the page was reloaded); its status then. */
async function settled(job, label) {
  let status = await api.status(job);
  while (status.state === "running" || (!status.loaded && status.state !== "failed")) {
    const { done, total } = status.progress;
    if (status.state === "running") {
      say(`${label}: waiting for its propagation to finish on the service (${done}/${total})…`);
      $("progress").value = total ? done / total : 0;
      $("progress-text").textContent = `${done}/${total}`;
    } else {
      say(`${label}: the service is loading the volume…`);
    }
    await new Promise((r) => setTimeout(r, 300));
    status = await api.status(job);
  }
  if (!status.loaded) throw new ApiError(400, status.error || "the service could not load the volume");
  return status;
}

/** Bring back the objects this tab had on this volume (before a reload, or before another file was opened), their
 * labels from the service (the undo history starts afresh). Returns how many of them the service no longer has. */
async function resumeObjects(saved) {
  if (!saved) return 0;
  state.running = "resume";
  refreshButtons();
  let lost = 0;
  try {
    for (const [n, kept] of saved.objects.entries()) {
      try {
        const status = await settled(kept.job, `object ${n + 1}`);
        const number = kept.number ?? 1;
        const labels = status.objects.some((o) => o.object === number)  // else made but never drawn on
          ? await labelsFromNifti(await api.result(kept.job, "nii.gz", { object: number }), state.grid.dims)
          : new Uint8Array(state.grid.size);
        state.views = status.volume.views;
        state.objects.push({ job: kept.job, number, labels, voxels: labels.reduce((sum, v) => sum + v, 0),
          clicks: new Map(kept.clicks), userSlices: new Set(kept.userSlices) });
      } catch (error) {
        if (!(error instanceof ApiError && [404, 410].includes(error.status))) throw error;
        lost++;  // expired or purged: the service has nothing left of it
      }
    }
  } catch (error) {  // the tab keeps what it remembered: opening the file again retries
    Object.assign(state, { objects: [], running: null });
    refreshButtons();
    throw new ApiError(0, `could not pick up your last session on this volume (${error.message}): `
      + "open the file again to retry");
  }
  state.running = null;
  state.active = Math.min(saved.active, Math.max(state.objects.length - 1, 0));
  for (let k = 0; k < state.grid.dims[2]; k++) paint(0, k);
  redraw();
  listObjects();
  refreshButtons();
  if (state.objects.length) {
    const expired = lost ? `, ${lost} expired on the service` : "";
    say(`picked up your last session on this volume: ${state.objects.length} object(s)${expired} (undo starts here)`);
  }
  return lost;
}

function listObjects() {
  $("objects").innerHTML = state.objects.map((_, n) => `<option value="${n}">${objectName(n)}</option>`).join("");
  $("objects").value = String(state.active);
}

/** A new object on the volume: the next object number in the job that holds the volume (uploaded for the first
 * object only); it starts with no box and the Box tool. */
async function addObject() {
  if (!state.grid || state.running) return;
  state.running = "upload";
  state.box = null;
  $("box-text").textContent = "drag a box on a slice";
  setTool("box");
  try {
    let job = state.objects.length ? state.objects[state.objects.length - 1].job : null;
    if (job === null) {
      say("uploading the volume to the service…");
      job = (await state.source.newJob(state.bytes)).id;
      state.views = (await settled(job, "the volume")).volume.views;
    }
    const numbers = state.objects.filter((o) => o.job === job).map((o) => o.number ?? 1);
    state.objects.push({ job, number: Math.max(0, ...numbers) + 1, labels: new Uint8Array(state.grid.size), voxels: 0,
      clicks: new Map(), userSlices: new Set() });
    state.active = state.objects.length - 1;
    listObjects();
    setTool("box");  // the new object's pen value
    say(`ready: drag a box on a slice (${objectName(state.active)})`);
  } catch (error) {
    failed(error);
  }
  state.running = null;
  refreshButtons();
}

// ---- view and window ----

function setView(type) {
  nv.setSliceType(type);
  document.querySelectorAll("[data-view]").forEach((b) => {
    b.classList.toggle("active", Number(b.dataset.view) === type);
    b.setAttribute("aria-pressed", String(Number(b.dataset.view) === type));
  });
}

/** Zoom the 2D views by `factor` (1: back to fit, and no pan). */
function zoom(factor) {
  const [x, y, z, scale] = nv.scene.pan2Dxyzmm;
  nv.setPan2Dxyzmm(factor === 1 ? [0, 0, 0, 1] : [x, y, z, Math.min(Math.max(scale * factor, 0.25), 16)]);
}

/** The intensity window that the service is asked to use: the preset, or the W/L the user set by right-drag. */
function windowParam() {
  const volume = nv.volumes[0];
  if ($("window").value !== "custom" || !volume) return $("window").value;
  return [volume.cal_max - volume.cal_min, (volume.cal_max + volume.cal_min) / 2];
}

let presetRange = null;  // [cal_min, cal_max] of the preset chosen last
let ctWindows = null;  // the service's CT presets (name → [width, level] in HU), asked for once

/** Show the chosen preset: a CT preset with the service's width and level (what the model sees), "mr" with the
 * volume's robust range. */
async function applyWindow() {
  const chosen = $("window").value;
  if (!nv.volumes[0] || chosen === "custom") return;
  try {
    ctWindows ??= await api.models().then((models) => models.window_presets);
  } catch (error) {
    say(`could not read the window presets: ${error.message}`, true);
    return;
  }
  const volume = nv.volumes[0];
  if (!volume || $("window").value !== chosen) return;  // another volume or preset meanwhile
  const preset = ctWindows[chosen];
  [volume.cal_min, volume.cal_max] = preset ? [preset[1] - preset[0] / 2, preset[1] + preset[0] / 2]
    : [volume.robust_min, volume.robust_max];
  presetRange = [volume.cal_min, volume.cal_max];
  nv.updateGLVolume();
}

function applyOpacity() {
  const opacity = Number($("opacity").value);
  // NiiVue's rim: the edge pixels of each mask at full opacity, the inside barely tinted
  nv.drawRimOpacity = $("outline").checked ? 1 : -1;
  nv.setDrawOpacity($("outline").checked ? Math.min(opacity, 0.08) : opacity);
}

// ---- on-image information ----

const number = (v) => (Math.abs(v) >= 100 ? Math.round(v) : Number(v.toPrecision(3))).toString();

/** The slice(s) shown (the service's view names and slice numbers, as in every message), W/L, zoom. */
function showInfo() {
  const volume = nv.volumes[0];
  if (!volume || !state.grid) return;
  const shown = nv.opts.sliceType === SLICE_TYPE.MULTIPLANAR ? [0, 1, 2] : [nv.opts.sliceType].filter((t) => t <= 2);
  const file = state.grid.rasToFile(Array.from(nv.frac2vox(nv.scene.crosshairPos)));
  $("slice-info").textContent = shown.map((axCorSag) => {
    const axis = state.grid.arrayAxisOfView(axCorSag);
    const count = state.grid.dims[2 - axis];
    return `${state.views ? viewOf(axis) : VIEW_NAMES[axCorSag]} ${file[2 - axis]}/${count - 1}`;
  }).join("  ");
  const [low, high] = [volume.cal_min, volume.cal_max];
  if (presetRange && (low !== presetRange[0] || high !== presetRange[1])) {  // a right-drag set W/L
    $("window").value = "custom";
    presetRange = null;
  }
  $("wl-info").textContent = `W ${number(high - low)} L ${number((high + low) / 2)}`;
  const convention = nv.opts.isRadiologicalConvention ? "  radiological" : "";
  $("zoom-info").textContent = `zoom ${Math.round(100 * nv.scene.pan2Dxyzmm[3])}%${convention}`;
}

// ---- marks on the image: the box and the active object's clicks, where they are on the slices shown ----

const marks = $("marks");

/** Canvas (CSS pixel) position of a RAS voxel on view `axCorSag`, or null when the view shows another slice. */
function screenPoint(ras, axCorSag) {
  const crosshair = nv.frac2vox(nv.scene.crosshairPos);
  if (Math.round(ras[2 - axCorSag]) !== crosshair[2 - axCorSag]) return null;
  const found = nv.frac2canvasPosWithTile(nv.vox2frac(ras), axCorSag);
  const dpr = nv.uiData.dpr || 1;
  return found && found.pos ? [found.pos[0] / dpr, found.pos[1] / dpr] : null;
}

function drawMarks() {
  const { width, height } = marks.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  if (marks.width !== Math.round(width * dpr) || marks.height !== Math.round(height * dpr)) {
    [marks.width, marks.height] = [Math.round(width * dpr), Math.round(height * dpr)];
  }
  const context = marks.getContext("2d");
  context.setTransform(dpr, 0, 0, dpr, 0, 0);
  context.clearRect(0, 0, width, height);
  if (!state.grid) return;
  const views = nv.screenSlices.map((tile) => tile.axCorSag).filter((v) => v >= 0 && v <= 2);
  context.lineWidth = 2;
  context.strokeStyle = "#ffd000";
  if (dragFrom && dragTo) {
    context.strokeRect(dragFrom[0], dragFrom[1], dragTo[0] - dragFrom[0], dragTo[1] - dragFrom[1]);
  } else if (state.box && views.includes(state.box.axCorSag)) {
    const [a, b] = state.box.ras.map((ras) => screenPoint(ras, state.box.axCorSag));
    if (a && b) context.strokeRect(a[0], a[1], b[0] - a[0], b[1] - a[1]);
  }
  const object = state.objects[state.active];
  for (const [key, points] of object ? object.clicks : []) {
    const [axis, index] = parseSliceKey(key);
    for (const [x, y, label] of points) {
      const ras = state.grid.fileToRas(state.grid.pixelToFile(axis, index, y, x));
      for (const view of views) {
        const at = screenPoint(ras, view);
        if (at) drawClick(context, at, label);
      }
    }
  }
}

/** A click's marker: a ring with + or − in it, white on black so it shows on any image and any mask. */
function drawClick(context, [x, y], label) {
  context.beginPath();
  context.arc(x, y, 7, 0, 2 * Math.PI);
  context.fillStyle = label ? "#ffffff" : "#202020";
  context.fill();
  context.lineWidth = 2;
  context.strokeStyle = label ? "#202020" : "#ffffff";
  context.stroke();
  context.beginPath();
  context.moveTo(x - 4, y);
  context.lineTo(x + 4, y);
  if (label) {
    context.moveTo(x, y - 4);
    context.lineTo(x, y + 4);
  }
  context.stroke();
}

const drawScene = nv.drawScene.bind(nv);
nv.drawScene = () => {  // NiiVue redraws on every pan, zoom, scroll and resize: the marks and the text follow it
  const drawn = drawScene();
  drawMarks();
  showInfo();
  return drawn;
};

// ---- the box: a left-drag with the Box tool (a middle-drag pans, a right-drag sets W/L: neither is a box) ----

let dragFrom = null;
let dragTo = null;
$("gl").addEventListener("pointerdown", (e) => {
  dragFrom = e.button === 0 && state.tool === "box" ? [e.offsetX, e.offsetY] : null;
  dragTo = null;
});
$("gl").addEventListener("pointermove", (e) => {
  if (!dragFrom) return;
  dragTo = [e.offsetX, e.offsetY];
  drawMarks();
});
window.addEventListener("pointerup", () => {
  requestAnimationFrame(() => {  // after NiiVue's own handler has reported the drag
    dragFrom = null;
    dragTo = null;
    drawMarks();
  });
});

nv.onDragRelease = (drag) => {
  if (!ready() || state.tool !== "box" || !dragFrom || drag.axCorSag < 0) return;
  const inside = (vox) => Array.from(vox).map((v, a) => Math.min(Math.max(v, 0), state.grid.dimsRAS[a] - 1));
  const ras = [inside(drag.voxStart), inside(drag.voxEnd)];
  const found = state.grid.boxOf(drag.axCorSag, ...ras);
  const view = viewOf(found.axis);
  if (found.box[0] === found.box[2] || found.box[1] === found.box[3]) {
    say("the box is too thin: drag a box around the object on one slice", true);
    return;
  }
  state.box = { ...found, view, ras, axCorSag: drag.axCorSag };
  $("box-text").textContent = `${view} slice ${found.slice}: [${found.box.join(", ")}]`;
  say("box set: Segment slice (S), or Propagate (Enter)");
  refreshButtons();
};

// ---- results into the drawing, with undo ----

function paint(axis, index) {
  state.grid.paintSlice(nv.drawBitmap, state.objects.map((o) => o.labels), axis, index);
}

function redraw() {
  nv.refreshDrawing(true);
  showLegend();
}

let redrawQueued = false;
/** redraw() at the next frame, once however many slices arrive before it: each redraw sends the whole drawing
 * to the GPU, and a fast worker streams slices faster than that. */
function redrawSoon() {
  if (redrawQueued) return;
  redrawQueued = true;
  requestAnimationFrame(() => {
    redrawQueued = false;
    redraw();
  });
}

/** Apply one slice to the active object's labels, noting what it replaced in the open history entry. */
function applySlice(entry, axis, index, mask) {
  const object = state.objects[entry.object];
  const key = sliceKey(axis, index);
  if (!entry.before.has(key)) entry.before.set(key, state.grid.readSlice(object.labels, axis, index));
  entry.after.set(key, mask);
  object.voxels += state.grid.writeSlice(object.labels, axis, index, mask);
  paint(axis, index);
}

/** Note a slice the user made (a box or clicks segmented there, a stroke, a slice propagated from). */
function markUserSlice(entry, axis, index) {
  const key = sliceKey(axis, index);
  const userSlices = state.objects[entry.object].userSlices;
  entry.user.push({ key, had: userSlices.has(key) });
  userSlices.add(key);
}

/** The user's slices along `axis` in start..end (all when no range) that have a mask, but `key`. */
function conditioningSlices(axis, key, start = -Infinity, end = Infinity) {
  const object = state.objects[state.active];
  return [...object.userSlices].map(parseSliceKey)
    .filter(([a, i]) => a === axis && i !== key && i >= start && i <= end
      && state.grid.readSlice(object.labels, a, i).some((v) => v))
    .map(([, i]) => i).sort((a, b) => a - b);
}

function openEntry(label) {
  return { label, object: state.active, before: new Map(), after: new Map(), user: [] };
}

function closeEntry(entry) {
  if (!entry.after.size) return;
  state.history.push(entry);
  state.future = [];
}

/** Send an entry's slices (its "before" or "after" side) to the service: downloads are made from its labels. */
async function sendSlices(entry, which) {
  const object = state.objects[entry.object];
  for (const [key, mask] of entry[which]) {
    const [axis, index] = parseSliceKey(key);
    const view = viewOf(axis);
    await api.writeSlice(jobOf(entry.object), { object: numberOf(entry.object), view, slice: index,
      mask: encodeMask(mask, state.grid.sliceShape(axis)) });
  }
}

/** Put an entry's slices (and clicks) back on the page and on the service. */
async function restore(entry, which) {
  const object = state.objects[entry.object];
  if (entry.clicks) object.clicks.set(entry.clicks.key, entry.clicks[which]);
  for (const { key, had } of entry.user) {
    if (which === "after" || had) object.userSlices.add(key);
    else object.userSlices.delete(key);
  }
  for (const [key, mask] of entry[which]) {
    const [axis, index] = parseSliceKey(key);
    object.voxels += state.grid.writeSlice(object.labels, axis, index, mask);
    paint(axis, index);
  }
  redraw();
  await sendSlices(entry, which);
}

async function undoRedo(from, to, verb) {
  const entry = from.pop();
  if (!entry) return;
  state.running = verb;
  refreshButtons();
  try {
    await restore(entry, verb === "undo" ? "before" : "after");
    to.push(entry);
    say(`${verb}: ${entry.label}`);
  } catch (error) {
    from.push(entry);
    failed(error);
  }
  state.running = null;
  refreshButtons();
}

// ---- segment and propagate ----

/** Segment one slice on the service from `prompt` (a box and/or clicks) and apply the mask as one undo step;
 * `onApplied(entry)` adds to that step. `from` says what it came from in the messages. */
async function segmentSlice(view, axis, slice, prompt, label, from = "", onApplied = () => {}) {
  state.running = "segment";
  refreshButtons();
  say(`segmenting ${view} slice ${slice}${from}…`);
  try {
    const reply = await api.segment(jobOf(state.active), { object: numberOf(state.active), view, slice, ...prompt,
      window: windowParam() });
    const entry = openEntry(label);
    onApplied(entry);
    applySlice(entry, axis, reply.slice, decodeMask(reply.mask));
    markUserSlice(entry, axis, reply.slice);
    closeEntry(entry);
    redraw();
    say(`segmented ${view} slice ${reply.slice}${from} in ${reply.seconds} s`);
  } catch (error) {
    failed(error);
  }
  state.running = null;
  refreshButtons();
}

function segment() {
  if (!state.box || state.running) return;
  const { view, slice, box, axis } = state.box;
  return segmentSlice(view, axis, slice, { box }, `segment ${view} slice ${slice}`);
}

let propagation = null;

/** Run a propagation along array `axis`. The user's other slices in the range condition it too; they, and a
 * key slice given as a `mask`, stay as drawn (the service keeps them, whatever its events say). */
async function propagate(params, axis, label) {
  const job = jobOf(state.active);
  state.running = "propagate";
  refreshButtons();
  $("progress").value = 0;
  $("progress-text").textContent = "";
  const entry = openEntry(label);
  const custom = params.range === "custom";
  const conditioning = conditioningSlices(axis, params.slice, custom ? params.start : -Infinity,
    custom ? params.end : Infinity);
  const kept = new Set(params.mask ? [...conditioning, params.slice] : conditioning);
  propagation = new AbortController();
  try {
    const started = await api.propagate(job, { object: numberOf(state.active), ...params, conditioning,
      early_stop: $("early-stop").checked,
      window: windowParam() });
    if (params.mask) markUserSlice(entry, axis, params.slice);
    say(conditioning.length ? `propagating with your slices ${conditioning.join(", ")}…` : "propagating…");
    let outcome = null;
    await followEvents(job, started.events_after, (event) => {
      if (event.data.propagation !== started.propagation) return;
      if (event.kind === "slice") {
        if (!kept.has(event.data.slice)) {
          applySlice(entry, event.data.array_axis, event.data.slice, decodeMask(event.data.mask));
        }
        redrawSoon();
        $("progress").value = event.data.done / event.data.total;
        $("progress-text").textContent = `${event.data.done}/${event.data.total}`;
      } else if (["done", "cancelled", "error"].includes(event.kind)) {
        outcome = event;
      }
    }, {
      until: (e) => e.data.propagation === started.propagation && ["done", "cancelled", "error"].includes(e.kind),
      onRetry: () => say("lost the connection to the service: reconnecting and resuming…", true),
      signal: propagation.signal,
    });
    if (outcome.kind === "done") {
      $("progress").value = 1;  // its total shrank by the slices an ended object skipped
      say(`propagated: ${outcome.data.slices} slices${describeEarlyEnd(outcome.data.ended_early)}`);
    } else if (outcome.kind === "cancelled") say(`cancelled: the ${outcome.data.slices} finished slices are kept`);
    else say(`propagation failed: ${outcome.data.message} (the ${outcome.data.slices_kept} finished slices are kept)`, true);
  } catch (error) {
    failed(error);
  }
  closeEntry(entry);
  propagation = null;
  state.running = null;
  refreshButtons();
}

/** Where tracking stopped because the object ended, from a `done` event's `ended_early` (direction → last slice
 * done), as engine.describe_early_end words it: ", done at slice 48 (forward) and slice 12 (backward): the object
 * ended"; "" when it went to the range's ends. */
function describeEarlyEnd(endedEarly) {
  const ends = Object.entries(endedEarly || {}).sort(([a], [b]) => b.localeCompare(a));
  if (!ends.length) return "";
  return `, done at ${ends.map(([direction, slice]) => `slice ${slice} (${direction})`).join(" and ")}: the object ended`;
}

function rangeParams() {
  const range = $("range").value;
  return range === "custom" ? { range, start: Number($("start").value), end: Number($("end").value) } : { range };
}

function propagateBox() {
  if (!state.box || state.running) return;
  const { view, slice, box } = state.box;
  const range = rangeParams();
  if (range.range === "box") {  // the service's "box" range needs RAS corners: the box's own slice here
    Object.assign(range, { range: "custom", start: slice, end: slice });
  }
  return propagate({ view, slice, box, ...range }, state.box.axis, `propagate from ${view} slice ${slice}`);
}

/** The view (name, array axis), slice and pixel (x: column, y: row) under the crosshair on the view shown. */
function currentSlice() {
  const axCorSag = nv.opts.sliceType === SLICE_TYPE.MULTIPLANAR ? (state.box ? 2 - state.box.axis : 0) : nv.opts.sliceType;
  const axis = state.grid.arrayAxisOfView(Math.min(axCorSag, 2));
  const file = state.grid.rasToFile(Array.from(nv.frac2vox(nv.scene.crosshairPos)));
  const view = viewOf(axis);
  const [rowAxis, colAxis] = [0, 1, 2].filter((a) => a !== axis);
  return { view, axis, slice: file[2 - axis], x: file[2 - colAxis], y: file[2 - rowAxis] };
}

function propagateFromHere() {
  if (!ready() || state.running) return;
  const { view, axis, slice } = currentSlice();
  const mask = state.grid.readSlice(state.objects[state.active].labels, axis, slice);
  if (!mask.some((v) => v)) {
    say(`${view} slice ${slice} has no mask to propagate: draw or segment it first`, true);
    return;
  }
  const range = rangeParams();
  if (range.range === "box") Object.assign(range, { range: "whole" });
  return propagate({ view, slice, mask: encodeMask(mask, state.grid.sliceShape(axis)), ...range }, axis,
    `propagate from corrected ${view} slice ${slice}`);
}

async function cancel() {
  if (state.running !== "propagate") return;
  say("cancelling…");  // before the request: the "cancelled" event may arrive before its reply
  try {
    await api.cancel(jobOf(state.active));
  } catch (error) {
    failed(error);
  }
}

// ---- clicks ----

const CLICK_LABELS = { positive: 1, negative: 0 };

/** A click where the crosshair is: that slice is segmented again from all the object's clicks on it, the box
 * when it is on that slice, and (on the service) the slice's current mask, which the clicks correct. */
function addClick(label) {
  const { view, axis, slice, x, y } = currentSlice();
  const object = state.objects[state.active];
  const key = sliceKey(axis, slice);
  const before = object.clicks.get(key) || [];
  const points = [...before, [x, y, label]];
  const box = state.box && state.box.axis === axis && state.box.slice === slice ? state.box.box : undefined;
  return segmentSlice(view, axis, slice, { points, box }, `${label ? "+" : "−"} click on ${view} slice ${slice}`,
    ` from ${points.length} click(s)`, (entry) => {
      entry.clicks = { key, before, after: points };
      object.clicks.set(key, points);
    });
}

// ---- tools: box, clicks, pen and eraser ----

function setTool(tool) {
  state.tool = tool;
  const drawing = tool === "pen" || tool === "eraser";
  nv.setDrawingEnabled(drawing);
  // NiiVue draws where its crosshair goes, and clicks go where it is: those tools need the left button on the
  // crosshair, the box does not
  nv.opts.mouseEventConfig.leftButton.primary = tool === "box" ? DRAG_MODE.callbackOnly : DRAG_MODE.crosshair;
  // the pen closes and fills its shape (NiiVue's filled pen); both draw brush-size wide
  if (drawing) nv.setPenValue(tool === "pen" ? state.active + 1 : 0, tool === "pen");
  refreshButtons();
}

// ---- encoding ahead (prefetch.js): with the Box or a Click tool, the slice on screen, while nothing runs ----
const prefetchShown = prefetcher(() => {
  if (!ready() || state.running || !(state.tool === "box" || state.tool in CLICK_LABELS)) return null;
  const { view, slice } = currentSlice();
  return { job: jobOf(state.active), view, slice, window: windowParam() };
});
onSliceMoved(nv, prefetchShown);

/** After a click, or a pen or eraser stroke: a click segments its slice again; a stroke's slice of the drawing
 * becomes the active object's slice. */
nv.onMouseUp = () => {
  if (!ready() || state.tool === "box") return;
  if (state.tool in CLICK_LABELS) {
    if (!state.running) addClick(CLICK_LABELS[state.tool]);
    return;
  }
  const { view, axis, slice } = currentSlice();
  const entry = openEntry(`${state.tool} on ${view} slice ${slice}`);
  const labels = state.objects[state.active].labels;
  applySlice(entry, axis, slice, state.grid.drawnSlice(nv.drawBitmap, axis, slice, state.active + 1, labels));
  markUserSlice(entry, axis, slice);
  closeEntry(entry);
  redraw();
  refreshButtons();
  sendSlices(entry, "after").catch(failed);  // the stroke reaches the labels that downloads are made from
};

// ---- downloads ----

/** Download the active object; the .seg.nrrd carries the object's name and colour as the page shows them, a PACS
 * series' DICOM SEG its name. */
async function download(format) {
  const n = state.active;
  try {
    const segment = format === "nii.gz" ? {} : { name: objectName(n), color: objectColor(n) };
    const blob = await api.result(jobOf(n), format, { object: numberOf(n), ...segment });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `${state.name.replace(/\.(nii\.gz|nii|nrrd|nhdr|mha)$/i, "")}_object${state.active + 1}.${format === "dicom-seg" ? "dcm" : format}`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (error) {
    failed(error);
  }
}

// ---- wiring ----

$("token").value = token.get();
$("token").addEventListener("change", () => token.set($("token").value.trim()));
$("open").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", () => {
  if ($("file").files[0]) openFile($("file").files[0]).catch(failed);
  $("file").value = "";  // the same file again is a change too
});
document.body.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dropping"); });
document.body.addEventListener("dragleave", () => document.body.classList.remove("dropping"));
document.body.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dropping");
  if (e.dataTransfer.files[0]) openFile(e.dataTransfer.files[0]).catch(failed);
});
document.querySelectorAll("[data-view]").forEach((b) => b.addEventListener("click", () => setView(Number(b.dataset.view))));
document.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
$("window").addEventListener("change", applyWindow);
$("range").addEventListener("change", () => { $("custom-range").hidden = $("range").value !== "custom"; });
$("segment").addEventListener("click", segment);
$("propagate").addEventListener("click", propagateBox);
$("propagate-here").addEventListener("click", propagateFromHere);
$("cancel").addEventListener("click", cancel);
$("undo").addEventListener("click", () => undoRedo(state.history, state.future, "undo"));
$("redo").addEventListener("click", () => undoRedo(state.future, state.history, "redo"));
$("new-object").addEventListener("click", addObject);
$("objects").addEventListener("change", () => { state.active = Number($("objects").value); setTool(state.tool); drawMarks(); });
$("opacity").addEventListener("input", applyOpacity);
$("outline").addEventListener("change", applyOpacity);
$("brush").addEventListener("input", setBrush);
$("radiological").addEventListener("change", () => nv.setRadiologicalConvention($("radiological").checked));
$("zoom-in").addEventListener("click", () => zoom(1.25));
$("zoom-out").addEventListener("click", () => zoom(0.8));
$("zoom-reset").addEventListener("click", () => zoom(1));
$("download-nii").addEventListener("click", () => download("nii.gz"));
$("download-seg").addEventListener("click", () => download("seg.nrrd"));
$("download-dicom-seg").addEventListener("click", () => download("dicom-seg"));
seriesList({ open: openFile, say, failed });  // after the token's listener: the list is asked for with the new token

function setBrush() {
  nv.opts.penSize = Number($("brush").value);
  $("brush-text").textContent = $("brush").value;
}

/** Toggle a checkbox from the keyboard, as a click on it would. */
function toggle(id) {
  $(id).checked = !$(id).checked;
  $(id).dispatchEvent(new Event("change"));
}

/** Brush size one step up or down, as the slider would. */
function stepBrush(steps) {
  steps > 0 ? $("brush").stepUp() : $("brush").stepDown();
  setBrush();
}

const KEYS = { s: segment, Enter: propagateBox, f: propagateFromHere, Escape: cancel, b: () => setTool("box"),
  p: () => setTool("pen"), e: () => setTool("eraser"), "+": () => setTool("positive"), "-": () => setTool("negative"),
  n: addObject, 1: () => setView(0), 2: () => setView(1), 3: () => setView(2), 4: () => setView(3),
  z: () => zoom(1.25), Z: () => zoom(0.8), r: () => zoom(1), l: () => toggle("radiological"), o: () => toggle("outline"),
  "[": () => stepBrush(-1), "]": () => stepBrush(1) };

/** Whether a key belongs to the focused control rather than to the shortcuts: typing in a text or number field or
 * a list, Enter or Space on a button or checkbox (it presses that control), arrows on a slider. */
function keyOfControl(e) {
  const target = e.target;
  if (target instanceof HTMLSelectElement || target instanceof HTMLTextAreaElement) return true;
  if (target instanceof HTMLInputElement && !["range", "checkbox"].includes(target.type)) return true;
  const control = target instanceof HTMLButtonElement || target instanceof HTMLInputElement;
  if (control && (e.key === "Enter" || e.key === " ")) return true;
  return target instanceof HTMLInputElement && target.type === "range" && /^(Arrow|Page|Home|End)/.test(e.key);
}

document.addEventListener("keydown", (e) => {
  if (keyOfControl(e)) return;
  if ((e.ctrlKey || e.metaKey) && e.key === "z") undoRedo(state.history, state.future, "undo");
  else if ((e.ctrlKey || e.metaKey) && e.key === "y") undoRedo(state.future, state.history, "redo");
  else if (KEYS[e.key] && !e.ctrlKey && !e.metaKey) KEYS[e.key]();
  else return;
  e.preventDefault();
});
setView(SLICE_TYPE.AXIAL);
setBrush();
refreshButtons();
say("open a NIfTI or NRRD volume (button or drag and drop)");
