// Voxel bookkeeping between NiiVue and the service.
// The service indexes the uploaded file's own voxel grid: array (k, j, i), C order, i fastest; a slice along
// array axis `a` is np.take(array, index, a), its box is [x_min, y_min, x_max, y_max] with x the column.
// NiiVue keeps its drawing in RAS-permuted voxel order: RAS axis p is file axis |permRAS[p]|-1, flipped
// when permRAS[p] < 0. Labels live here in the file's order; the drawing is rebuilt from them per slice.

/** The drawing's value where objects overlap (NiiVue's draw colour table has 255 entries; objects use 1, 2, …). */
export const OVERLAP = 255;

/** The mapping of one loaded NiiVue volume: file dims (i, j, k) and the RAS permutation. */
export class VoxelGrid {
  constructor(volume) {
    this.dims = [volume.hdr.dims[1], volume.hdr.dims[2], volume.hdr.dims[3]];
    this.perm = volume.permRAS.map((p) => Math.abs(p) - 1);
    this.flip = volume.permRAS.map((p) => p < 0);
    this.dimsRAS = [0, 1, 2].map((p) => this.dims[this.perm[p]]);
    this.size = this.dims[0] * this.dims[1] * this.dims[2];
  }

  /** A voxel moved between NiiVue's RAS order and the file's (i, j, k): the same axis pairs and flips both ways. */
  convert(voxel, toFile) {
    const out = [0, 0, 0];
    for (let p = 0; p < 3; p++) {
      const a = this.perm[p];
      const [from, to] = toFile ? [p, a] : [a, p];
      out[to] = this.flip[p] ? this.dims[a] - 1 - voxel[from] : voxel[from];
    }
    return out;
  }

  rasToFile(ras) {
    return this.convert(ras, true);
  }

  fileToRas(file) {
    return this.convert(file, false);
  }

  /** File array axis (0 = k, 1 = j, 2 = i) normal to NiiVue's view (0 axial, 1 coronal, 2 sagittal). */
  arrayAxisOfView(axCorSag) {
    return 2 - this.perm[2 - axCorSag];
  }

  /** [rows, cols] of a slice along array axis `axis`: the two remaining array axes, in order. */
  sliceShape(axis) {
    const shapeKji = [this.dims[2], this.dims[1], this.dims[0]];
    return shapeKji.filter((_, a) => a !== axis);
  }

  /** File voxel (i, j, k) of pixel (row, col) of slice `index` along array axis `axis`. */
  pixelToFile(axis, index, row, col) {
    const kji = [0, 0, 0];
    const [rowAxis, colAxis] = [0, 1, 2].filter((a) => a !== axis);
    kji[axis] = index;
    kji[rowAxis] = row;
    kji[colAxis] = col;
    return [kji[2], kji[1], kji[0]];
  }

  fileIndex(file) {
    return file[0] + this.dims[0] * (file[1] + this.dims[1] * file[2]);
  }

  rasIndex(ras) {
    return ras[0] + this.dimsRAS[0] * (ras[1] + this.dimsRAS[1] * ras[2]);
  }

  /** The service's slice box for a box dragged between two NiiVue RAS voxels on view `axCorSag`. */
  boxOf(axCorSag, rasStart, rasEnd) {
    const axis = this.arrayAxisOfView(axCorSag);
    const [a, b] = [this.rasToFile(rasStart), this.rasToFile(rasEnd)];
    const [rowAxis, colAxis] = [0, 1, 2].filter((x) => x !== axis);
    const along = (arrayAxis, v) => v[2 - arrayAxis];
    const cols = [along(colAxis, a), along(colAxis, b)];
    const rows = [along(rowAxis, a), along(rowAxis, b)];
    return {
      axis,
      slice: along(axis, a),
      box: [Math.min(...cols), Math.min(...rows), Math.max(...cols), Math.max(...rows)],
    };
  }

  /** Call `visit(pixel, fileIndex, rasIndex)` for each pixel (row-major) of slice `index` along array axis `axis`. */
  forEachPixel(axis, index, visit) {
    const [rows, cols] = this.sliceShape(axis);
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const file = this.pixelToFile(axis, index, r, c);
        visit(r * cols + c, this.fileIndex(file), this.rasIndex(this.fileToRas(file)));
      }
    }
  }

  /** Slice `index` along array axis `axis` of file-ordered `labels` as a 0/1 Uint8Array (rows x cols). */
  readSlice(labels, axis, index) {
    const [rows, cols] = this.sliceShape(axis);
    const out = new Uint8Array(rows * cols);
    this.forEachPixel(axis, index, (pixel, at) => { out[pixel] = labels[at] ? 1 : 0; });
    return out;
  }

  /** Write a rows x cols 0/1 `mask` into slice `index` along array axis `axis` of file-ordered `labels`; the
   * change in the labels' voxel count. */
  writeSlice(labels, axis, index, mask) {
    let added = 0;
    this.forEachPixel(axis, index, (pixel, at) => {
      added += mask[pixel] - labels[at];
      labels[at] = mask[pixel];
    });
    return added;
  }

  /** Copy slice `index` along `axis` of every object's labels into NiiVue's drawing (object n → pen n + 1; a
   * voxel in two or more objects → OVERLAP, so overlaps show). */
  paintSlice(drawing, objects, axis, index) {
    this.forEachPixel(axis, index, (_, at, ras) => {
      let value = 0;
      objects.forEach((labels, n) => { if (labels[at]) value = value ? OVERLAP : n + 1; });
      drawing[ras] = value;
    });
  }

  /** Object `pen`'s voxels of slice `index` along `axis` as drawn in NiiVue's drawing (0/1, rows x cols): its pen
   * value, and the overlap voxels its `labels` had. */
  drawnSlice(drawing, axis, index, pen, labels) {
    const [rows, cols] = this.sliceShape(axis);
    const out = new Uint8Array(rows * cols);
    this.forEachPixel(axis, index, (pixel, at, ras) => {
      out[pixel] = drawing[ras] === pen || (drawing[ras] === OVERLAP && labels[at]) ? 1 : 0;
    });
    return out;
  }
}

/** Run lengths (zeros first) of the service's mask codec → 0/1 Uint8Array. */
export function decodeMask(payload) {
  const out = new Uint8Array(payload.shape[0] * payload.shape[1]);
  let at = 0;
  payload.counts.forEach((run, n) => {
    if (n % 2 === 1) out.fill(1, at, at + run);
    at += run;
  });
  return out;
}

/** 0/1 mask (rows x cols) → the service's run lengths. */
export function encodeMask(mask, shape) {
  const counts = [];
  let value = 0;
  let run = 0;
  for (const v of mask) {
    if ((v ? 1 : 0) === value) { run++; continue; }
    counts.push(run);
    value = 1 - value;
    run = 1;
  }
  counts.push(run);
  return { shape, counts };
}
