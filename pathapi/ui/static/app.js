// pathapi storage browser: live updates. The server sends an event "change" on /events
// whenever a persist, a new version or a transfer record lands in the store; the page then
// fetches itself again and swaps in the new <main>. No framework, no build step.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!window.EventSource || !live) { return; }
  var source = new EventSource("/events");
  var busy = false;
  function refresh() {
    if (busy) { return; }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main) {
          main.replaceWith(document.adoptNode(fresh));
          document.body.dataset.updated = String(Date.now());
        }
      })
      .catch(function () { /* the next change tries again */ })
      .then(function () { busy = false; });
  }
  source.addEventListener("open", function () { live.className = "live on"; });
  source.addEventListener("error", function () { live.className = "live off"; });
  source.addEventListener("change", refresh);
})();
