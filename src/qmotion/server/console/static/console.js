// qmotion console: the task page's live stream. Everything else works without script.
"use strict";
(function () {
  function stream(section) {
    var url = section.getAttribute("data-stream");
    if (!url || !window.EventSource) { return null; }
    var source = new EventSource(url);
    source.addEventListener("progress", function (ev) {
      var body = document.getElementById("progress-body");
      // The server renders the fragment with the same escaping as the page itself.
      if (body) { body.outerHTML = ev.data; }
    });
    source.addEventListener("state", function (ev) {
      var state = document.getElementById("task-state");
      if (state) {
        state.textContent = ev.data;
        state.className = "state state-" + ev.data;
      }
    });
    source.addEventListener("done", function () {
      source.close();
      // The finished page carries the report and the chart, rendered by the server.
      window.location.reload();
    });
    return source;
  }
  document.addEventListener("DOMContentLoaded", function () {
    var section = document.querySelector("[data-stream]");
    if (!section) { return; }
    var source = stream(section);
    // A hidden tab gives its connection back (browsers allow few per host); shown again,
    // the page is read afresh and streams again.
    document.addEventListener("visibilitychange", function () {
      if (document.hidden && source) { source.close(); source = null; }
      else if (!document.hidden && !source) { window.location.reload(); }
    });
  });
})();
