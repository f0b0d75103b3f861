/** OHIF Viewer 3.13 configuration for ms-forecast-node's viewer check (tests/viewer/).
 *
 * Served by tests/viewer/stack.py in place of dist/app-config.js. One DICOMweb data source on
 * the page's own origin: the proxy forwards /dicom-web/ to the test's Orthanc (DICOMweb plugin).
 * Based on OHIF's own Orthanc configuration (platform/app/public/config/docker-nginx-orthanc.js).
 */
window.config = {
  name: 'ms-forecast-node viewer check',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {
    // The first-visit onboarding tour (shepherd.js, customization 'ohif.tours', route /viewer)
    // would cover the viewport in every fresh browser profile: no tours at all.
    'ohif.tours': { $set: [] },
  },
  // "OHIF Viewer is for investigational use only" banner at the bottom of the viewer.
  investigationalUseDialog: { option: 'never' },
  // Opening a SEG series hydrates it onto its source series without the "load?" prompt.
  disableConfirmationPrompts: true,
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  // SwiftShader gives the browser WebGL; were it missing, the check should fail on the missing
  // overlay rather than on a modal about CPU rendering.
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  showErrorDetails: 'always',
  // OHIF calls this for every failed image load and throws "handler is not a function" when
  // it is missing (a config without it logs a TypeError instead of the load error). Keep the
  // failures where the check's driver can report them.
  httpErrorHandler: error => {
    window.__msfnImageLoadErrors = window.__msfnImageLoadErrors || [];
    window.__msfnImageLoadErrors.push({
      status: error?.status ?? null,
      message: String(error?.message ?? error).slice(0, 500),
      url: error?.url ?? error?.request?.responseURL ?? null,
    });
    console.warn('image load failed', error?.status, error?.message ?? error);
  },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        // Orthanc is a live DICOMweb server, not a static (S3) store of JSON files.
        staticWado: false,
        dicomUploadEnabled: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
