// The PACS panel: the image series on the service's DICOMweb server (no patient names or IDs: the service sends
// none). Choosing one makes a job from it on the service, which fetches the series itself; the page downloads the
// volume the worker reads and opens it as it opens a dropped file. Further objects on that volume are jobs from the
// same series too, so every object has its DICOM SEG. The panel stays hidden when the service has no DICOMweb server.
import { api, ApiError } from "./api.js";

const $ = (id) => document.getElementById(id);

/** A series' line in the list: modality, number, description, instance count. */
function describe(series) {
  const number = series.number === null ? "" : ` #${series.number}`;
  const count = series.instances === null ? "" : ` · ${series.instances} images`;
  return `${series.modality}${number} · ${series.description || "(no description)"}${count}`;
}

/** A file name for the series' volume (the downloads are named after it): modality, number, description. */
function fileName(series) {
  const words = [series.modality, series.number ?? "", series.description].filter((w) => w !== "").join("_");
  return `${words.replace(/[^\w.-]+/g, "_") || "series"}.nrrd`;
}

/** The panel, wired to the viewer: `open(file, source)` opens a volume as a dropped file whose objects' jobs come
 * from `source.newJob()`; `say` and `failed` report as the viewer does. */
export function seriesList({ open, say, failed }) {
  let choosing = false;
  let chosen = null;  // the series UID opened last: marked in the list, also after it is listed again
  let asked = 0;  // the latest listing: an older reply (e.g. without the token just entered) is dropped

  async function load() {
    const ask = ++asked;
    $("pacs-text").textContent = "listing…";
    try {
      const { series } = await api.pacsSeries();
      if (ask !== asked) return;
      $("pacs-series").replaceChildren(...series.map((item) => {
        const button = document.createElement("button");
        button.textContent = describe(item);
        button.title = `series ${item.series_uid}`;
        button.dataset.series = item.series_uid;
        button.classList.toggle("active", item.series_uid === chosen);
        button.addEventListener("click", () => choose(item));
        const row = document.createElement("li");
        row.append(button);
        return row;
      }));
      $("pacs-text").textContent = series.length ? `${series.length} series` : "no image series";
      $("pacs").hidden = false;
    } catch (error) {
      if (ask !== asked) return;
      if (error instanceof ApiError && error.status === 503) {  // no DICOMweb server, or none answering
        $("pacs").hidden = true;
        return;
      }
      $("pacs-series").replaceChildren();
      $("pacs-text").textContent = error.message;
      $("pacs").hidden = false;
    }
  }

  async function choose(series) {
    if (choosing) return;
    choosing = true;
    chosen = series.series_uid;
    document.querySelectorAll("#pacs-series button").forEach((b) => b.classList.toggle("active", b.dataset.series === chosen));
    say(`the service is fetching ${describe(series)} from the PACS…`);
    let unused = null;  // the job made to fetch the volume, until the viewer takes it for its first object
    try {
      unused = await api.createDicomwebJob(series.series_uid, series.study_uid);
      const bytes = await api.volume(unused.id);
      await open(new File([bytes], fileName(series)), {
        dicom: true,
        newJob: async () => {
          if (!unused) return api.createDicomwebJob(series.series_uid, series.study_uid);
          const job = unused;
          unused = null;
          return job;
        },
      });
    } catch (error) {
      failed(error);
    }
    if (unused) api.deleteJob(unused.id).catch(() => {});  // the viewer was busy, or picked up its last session
    choosing = false;
  }

  $("pacs-refresh").addEventListener("click", load);
  $("token").addEventListener("change", load);
  return load();
}
